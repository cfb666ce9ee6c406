"""The callback registry: ``@callback``, ``@local``, ``alias`` and ``REGISTRY`` (SPEC §3)."""

from __future__ import annotations

import functools
import threading

import daffi.registry
import pytest
from daffi.exceptions import InitializationError
from daffi.registry import REGISTRY, Registry, alias, callback, local

# -- functions ------------------------------------------------------------------------------


def test_public_names_of_daffi_registry():
    assert daffi.registry.callback is callback
    assert daffi.registry.local is local
    assert daffi.registry.alias is alias
    assert isinstance(REGISTRY, Registry)


def test_function_registers_under_its_name_and_still_works():
    def reg_add(a, b):
        """Add two numbers."""
        return a + b

    decorated = callback(reg_add)

    assert decorated(2, 3) == 5
    assert decorated.__name__ == "reg_add"
    assert decorated.__doc__ == "Add two numbers."
    assert REGISTRY.get("reg_add") is reg_add
    assert REGISTRY.get("reg_add")(10, 5) == 15
    assert "reg_add" in REGISTRY.names()
    assert REGISTRY.is_async("reg_add") is False
    assert REGISTRY.lookup("reg_add") == (reg_add, False)


def test_decorator_syntax_keeps_the_function_usable():
    @callback
    def reg_greet(name: str) -> str:
        return f"Hello, {name}!"

    assert reg_greet("Alice") == "Hello, Alice!"
    assert reg_greet.__annotations__ == {"name": "str", "return": "str"}
    assert REGISTRY.get("reg_greet")("Bob") == "Hello, Bob!"


def test_functools_wraps_metadata_survives():
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs) * 2

        return wrapper

    @callback
    @deco
    def reg_wrapped(x):
        """Doubles."""
        return x

    assert reg_wrapped(4) == 8
    assert reg_wrapped.__doc__ == "Doubles."
    assert reg_wrapped.__wrapped__(4) == 4
    assert REGISTRY.get("reg_wrapped")(5) == 10


def test_async_function_is_registered_and_flagged():
    @callback
    async def reg_async_double(x):
        return 2 * x

    assert REGISTRY.is_async("reg_async_double") is True
    fn, is_async = REGISTRY.lookup("reg_async_double")
    assert is_async is True
    assert fn is reg_async_double


def test_unknown_names():
    assert REGISTRY.get("reg_no_such_function") is None
    assert REGISTRY.lookup("reg_no_such_function") is None
    assert REGISTRY.is_async("reg_no_such_function") is False
    assert "reg_no_such_function" not in REGISTRY


def test_names_are_sorted():
    for name in ("reg_zeta", "reg_alpha", "reg_mid"):
        callback(_make_function(name))
    names = REGISTRY.names()
    assert names == sorted(names)
    mine = [n for n in names if n in ("reg_zeta", "reg_alpha", "reg_mid")]
    assert mine == ["reg_alpha", "reg_mid", "reg_zeta"]
    assert REGISTRY.get("reg_mid")() == "reg_mid"


def test_lambda_is_refused():
    with pytest.raises(InitializationError, match="lambda"):
        callback(lambda: 1)


def test_generator_function_is_refused():
    def reg_gen():
        yield 1

    with pytest.raises(InitializationError, match="generator"):
        callback(reg_gen)
    assert REGISTRY.get("reg_gen") is None


def test_async_generator_function_is_refused():
    async def reg_agen():
        yield 1

    with pytest.raises(InitializationError, match="async generator"):
        callback(reg_agen)
    assert REGISTRY.get("reg_agen") is None


@pytest.mark.parametrize("obj", [42, "name", None, functools.partial(print, "x")])
def test_objects_without_a_usable_name_are_refused(obj):
    with pytest.raises(InitializationError):
        callback(obj)


def test_duplicate_name_is_refused_and_first_one_kept():
    @callback
    def reg_dup():
        return "first"

    def make_second():
        def reg_dup():
            return "second"

        return reg_dup

    with pytest.raises(InitializationError, match="reg_dup"):
        callback(make_second())
    assert REGISTRY.get("reg_dup")() == "first"


def test_unregister_for_tests():
    @callback
    def reg_temp():
        return 1

    REGISTRY._unregister_for_tests("reg_temp")
    assert REGISTRY.get("reg_temp") is None
    REGISTRY._unregister_for_tests("reg_temp")  # absent: no error

    @callback
    def reg_temp():  # noqa: F811 - registering the name again is the point
        return 2

    assert REGISTRY.get("reg_temp")() == 2


# -- bound methods ----------------------------------------------------------------------------


def test_bound_method_registration_uses_that_instance():
    class Counter:
        def __init__(self, start):
            self.value = start

        def reg_bump(self, by):
            self.value += by
            return self.value

    counter = Counter(100)
    returned = callback(counter.reg_bump)

    assert returned == counter.reg_bump
    assert REGISTRY.get("reg_bump")(5) == 105
    assert counter.value == 105
    # The function shared by all instances is not marked as registered.
    assert not hasattr(Counter.reg_bump, "__daffi_callback_names__")


# -- classes ---------------------------------------------------------------------------------


def test_class_registers_public_methods_of_one_instance():
    created = []

    @callback
    class RegCalc:
        def __init__(self):
            created.append(self)
            self.total = 0

        def reg_cls_add(self, x):
            self.total += x
            return self.total

        def reg_cls_total(self):
            return self.total

        def _reg_cls_private(self):
            return "private"

        @local
        def reg_cls_local(self):
            return "local"

        @local()
        def reg_cls_local_call(self):
            return "local"

        @staticmethod
        def reg_cls_static(x):
            return x * 3

        @classmethod
        def reg_cls_classmethod(cls):
            return cls.__name__

    assert isinstance(RegCalc, type)  # the class itself is returned
    assert len(created) == 1
    exported = {n for n in REGISTRY.names() if n.startswith(("reg_cls", "_reg_cls"))}
    assert exported == {
        "reg_cls_add",
        "reg_cls_total",
        "reg_cls_static",
        "reg_cls_classmethod",
    }
    assert REGISTRY.get("reg_cls_add")(2) == 2
    assert REGISTRY.get("reg_cls_add")(3) == 5
    assert REGISTRY.get("reg_cls_total")() == 5
    assert created[0].total == 5
    assert REGISTRY.get("reg_cls_static")(4) == 12
    assert REGISTRY.get("reg_cls_classmethod")() == "RegCalc"
    # Local methods remain ordinary methods.
    assert created[0].reg_cls_local() == "local"
    assert created[0].reg_cls_local_call() == "local"


def test_class_inherited_methods_and_async_methods():
    class Base:
        def reg_inh_base(self):
            return "base"

    @callback
    class RegChild(Base):
        async def reg_inh_async(self):
            return "async"

    assert REGISTRY.get("reg_inh_base")() == "base"
    assert REGISTRY.is_async("reg_inh_async") is True
    assert REGISTRY.is_async("reg_inh_base") is False


def test_class_properties_are_not_evaluated():
    @callback
    class RegProps:
        limit = 10

        @property
        def reg_prop_boom(self):
            raise AssertionError("a property was evaluated during registration")

        def reg_prop_ok(self):
            return "ok"

    assert REGISTRY.get("reg_prop_ok")() == "ok"
    assert REGISTRY.get("reg_prop_boom") is None
    assert REGISTRY.get("limit") is None


def test_class_needing_constructor_arguments_is_refused():
    class RegNeedsArgs:
        def __init__(self, config):
            self.config = config

        def reg_needs_args_m(self):
            return 1

    with pytest.raises(InitializationError, match="no arguments"):
        callback(RegNeedsArgs)
    assert REGISTRY.get("reg_needs_args_m") is None


def test_class_registration_is_all_or_nothing():
    @callback
    def reg_atomic_taken():
        return "function"

    class RegClash:
        def reg_atomic_free(self):
            return 1

        def reg_atomic_taken(self):
            return 2

    with pytest.raises(InitializationError, match="reg_atomic_taken"):
        callback(RegClash)
    assert REGISTRY.get("reg_atomic_free") is None
    assert REGISTRY.get("reg_atomic_taken")() == "function"

    class RegWithGenerator:
        def reg_atomic_fine(self):
            return 1

        def reg_atomic_gen(self):
            yield 1

    with pytest.raises(InitializationError, match="generator"):
        callback(RegWithGenerator)
    assert REGISTRY.get("reg_atomic_fine") is None


def test_class_with_only_private_methods_registers_nothing():
    before = REGISTRY.names()

    @callback
    class RegNothing:
        def _hidden(self):
            return 1

    assert REGISTRY.names() == before


# -- local -------------------------------------------------------------------------------------


def test_local_returns_the_function_unchanged():
    def reg_plain(x):
        return x + 1

    assert local(reg_plain) is reg_plain
    assert local()(reg_plain) is reg_plain
    assert reg_plain(1) == 2


# -- alias -------------------------------------------------------------------------------------


def test_alias_below_callback_exports_both_names():
    @callback
    @alias("reg_alias_short")
    def reg_alias_long_name(x):
        return x * 10

    assert REGISTRY.get("reg_alias_long_name") is reg_alias_long_name
    assert REGISTRY.get("reg_alias_short") is reg_alias_long_name
    assert reg_alias_long_name(2) == 20


def test_alias_above_callback_exports_both_names():
    @alias("reg_alias_above")
    @callback
    def reg_alias_base(x):
        return x - 1

    assert REGISTRY.get("reg_alias_base")(5) == 4
    assert REGISTRY.get("reg_alias_above")(5) == 4


def test_stacked_aliases():
    @callback
    @alias("reg_stack_a")
    @alias("reg_stack_b")
    def reg_stack(x):
        return x

    for name in ("reg_stack", "reg_stack_a", "reg_stack_b"):
        assert REGISTRY.get(name) is reg_stack


def test_alias_equal_to_own_name_is_harmless():
    @callback
    @alias("reg_self_alias")
    def reg_self_alias():
        return 1

    assert REGISTRY.get("reg_self_alias")() == 1


def test_alias_on_a_method_of_a_callback_class():
    @callback
    class RegAliased:
        @alias("reg_m_alias")
        def reg_m(self):
            return "m"

    assert REGISTRY.get("reg_m")() == "m"
    assert REGISTRY.get("reg_m_alias")() == "m"


def test_alias_conflict_registers_nothing():
    @callback
    def reg_alias_owner():
        return 1

    @alias("reg_alias_owner")
    def reg_alias_wants():
        return 2

    with pytest.raises(InitializationError, match="reg_alias_owner"):
        callback(reg_alias_wants)
    assert REGISTRY.get("reg_alias_wants") is None
    assert REGISTRY.get("reg_alias_owner")() == 1


@pytest.mark.parametrize("bad", [1, None, b"name", ["name"]])
def test_alias_requires_a_str(bad):
    with pytest.raises(ValueError, match="str"):
        alias(bad)


def test_alias_refuses_empty_name():
    with pytest.raises(ValueError):
        alias("")


def test_alias_on_a_class_is_refused():
    with pytest.raises(InitializationError, match="class"):

        @alias("reg_class_alias")
        class RegNope:
            pass


# -- subscribers ---------------------------------------------------------------------------------


def test_subscribers_hear_new_names_until_unsubscribed():
    heard: list[list[str]] = []
    unsubscribe = REGISTRY.subscribe(heard.append)
    try:

        @callback
        @alias("reg_sub_alias")
        def reg_sub_one():
            return 1

        @callback
        class RegSub:
            def reg_sub_b(self):
                return 1

            def reg_sub_a(self):
                return 1

        assert heard == [["reg_sub_one", "reg_sub_alias"], ["reg_sub_a", "reg_sub_b"]]
    finally:
        unsubscribe()
    unsubscribe()  # idempotent

    @callback
    def reg_sub_after():
        return 1

    assert len(heard) == 2


def test_failed_registration_is_not_announced():
    heard: list[list[str]] = []

    @callback
    def reg_sub_taken():
        return 1

    unsubscribe = REGISTRY.subscribe(heard.append)
    try:
        with pytest.raises(InitializationError):
            callback(alias("reg_sub_taken")(_make_function("reg_sub_other")))
    finally:
        unsubscribe()
    assert heard == []


def test_a_failing_subscriber_does_not_break_registration(caplog):
    def broken(names):
        raise RuntimeError("subscriber bug")

    heard: list[list[str]] = []
    unsubscribe_broken = REGISTRY.subscribe(broken)
    unsubscribe_ok = REGISTRY.subscribe(heard.append)
    try:

        @callback
        def reg_sub_robust():
            return "still registered"

    finally:
        unsubscribe_broken()
        unsubscribe_ok()
    assert REGISTRY.get("reg_sub_robust")() == "still registered"
    assert heard == [["reg_sub_robust"]]
    assert "subscriber" in caplog.text


# -- threads ------------------------------------------------------------------------------------


def test_concurrent_registration_from_threads():
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(i):
        barrier.wait()
        try:
            for j in range(50):
                callback(_make_function(f"reg_thread_{i}_{j}"))
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    names = [n for n in REGISTRY.names() if n.startswith("reg_thread_")]
    assert len(names) == 400
    assert REGISTRY.get("reg_thread_7_49")() == "reg_thread_7_49"


def test_registry_is_restored_between_tests():
    # Names registered by the tests above must be gone (conftest restores the registry).
    assert REGISTRY.get("reg_add") is None
    assert REGISTRY.get("reg_thread_0_0") is None


def _make_function(name):
    def fn():
        return name

    fn.__name__ = name
    fn.__qualname__ = name
    return fn
