"""The public surface: runtime.__all__ sorted and complete; brokers never import runtime."""

from __future__ import annotations

import subprocess
import sys
import types

import runtime
import runtime.errors


def test_all_is_sorted_and_unique() -> None:
    assert runtime.__all__ == sorted(runtime.__all__)
    assert len(set(runtime.__all__)) == len(runtime.__all__)


def test_every_exported_name_is_importable() -> None:
    for name in runtime.__all__:
        assert getattr(runtime, name, None) is not None, name
    namespace: dict[str, object] = {}
    exec("from runtime import *", namespace)
    assert set(runtime.__all__) <= set(namespace)


def test_every_public_name_is_exported() -> None:
    public = {
        name for name, value in vars(runtime).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(runtime.__all__)


def test_submodules_export_what_they_define() -> None:
    for module_name in ("app", "canvas", "codec", "errors", "messages", "registry", "results",
                        "retry", "worker"):
        module = __import__(f"runtime.{module_name}", fromlist=["__all__"])
        for name in module.__all__:
            assert hasattr(module, name), f"runtime.{module_name}.{name}"


def test_every_runtime_error_is_exported() -> None:
    errors = {
        name for name in runtime.errors.__all__
        if getattr(runtime.errors, name).__module__ == "runtime.errors"
    }
    assert errors <= set(runtime.__all__)


def test_every_error_has_one_root() -> None:
    for name in runtime.__all__:
        value = getattr(runtime, name)
        if isinstance(value, type) and issubclass(value, Exception) and name not in (
                "Retry", "Reject", "SoftTimeLimitExceeded"):  # control flow inside a task
            assert issubclass(value, runtime.TaskloomError), name
    assert not issubclass(runtime.Retry, runtime.TaskloomError)
    assert not issubclass(runtime.Reject, runtime.TaskloomError)


def test_brokers_never_import_runtime() -> None:
    code = (
        "import sys, brokers, brokers.memory, brokers.base\n"
        "brokers.from_url('memory://')\n"
        "bad = sorted(m for m in sys.modules if m == 'runtime' or m.startswith('runtime.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60)
    assert out.stdout.strip() == ""


def test_importing_runtime_does_not_import_the_server_clients() -> None:
    code = (
        "import sys, runtime\n"
        "heavy = ('redis', 'aio_pika', 'aiormq')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60)
    assert out.stdout.strip() == ""
