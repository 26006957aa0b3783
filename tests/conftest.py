"""Test set-up shared by every file.

Triton decides at decoration time whether kernels are compiled or interpreted, so TRITON_INTERPRET must be set
before anything imports triton. Without CUDA the suite interprets the kernels on the CPU; with CUDA it compiles
them and runs the tests marked ``cuda`` (run ``TRITON_INTERPRET=1 pytest -m interpret`` separately there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id), so inputs are new every run."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="session", autouse=True)
def _each_gguf_file_parsed_once():
    """Two pure, read-only steps of loading a GGUF model dominate the suite's SmolLM2 loads on 2 cores, and
    transformers repeats them on every load: parsing the file's header (``gguf.GGUFReader``: about 300k fields, the
    tokenizer's vocabulary and merges; twice per model, for the config and the weights, and once per tokenizer) and
    building the GGUF tensor-name map (``gguf.get_tensor_name_map``: once per submodule, 397 times for SmolLM2, all
    equal). Within this process each is made once per file (keyed by path and modification time) or per
    (architecture, layers) and reused, read-only (the reader memory-maps the file). Every load still runs all of
    transformers' conversion, dequantization and weight loading. Subprocesses load as usual."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    name_maps: dict = {}

    def reader(path, mode="r"):
        if mode != "r":
            return original_reader(path, mode)
        key = (os.path.realpath(path), os.stat(path).st_mtime_ns)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def _patch_the_interpreters_language_once_per_launch():
    """Triton's interpreter (3.x) swaps ``triton.language``'s builtins for interpreted ones at each kernel launch
    and restores them after it; it also redoes the swap at every call of a ``@triton.jit`` helper inside the
    kernel (``tl.sum``, ``tl.max``, the package's own helpers: thousands per launch), each a scan of the modules'
    members that changes nothing, since the launch has already swapped them. Here a helper's swap is skipped when
    the running launch has already swapped every language module the helper sees (``tl``, ``tl.core``); one that
    sees another still swaps (and restores) it, as before. The kernels run the same interpreted operations (their
    results are bitwise those without this), at 30-45% less interpreter time. Kept out when Triton's interpreter
    has no ``_patch_lang``."""
    import inspect

    try:
        from triton import language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None:
        return
    launch: list[frozenset] = []  # the language modules the running launch has swapped (launches never nest)
    seen: dict = {}

    def languages(fn) -> frozenset:
        if fn not in seen:
            seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[fn]

    class _Launch:  # the launch's own scope: restoring it ends the launch
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            launch.clear()
            self.scope.restore()

    class _AlreadySwapped:
        def restore(self):
            pass

    def patch_lang(fn):
        mine = languages(fn)
        if launch:  # a helper called inside the running launch
            if mine <= launch[0]:
                return _AlreadySwapped()
            # another module: swapped for this helper and restored after it, as Triton does (the launch's set is
            # not widened, since that restore undoes the swap)
            return original(fn)
        scope = _Launch(original(fn))
        launch.append(mine)
        return scope

    interpreter._patch_lang = patch_lang


if INTERPRET:
    _patch_the_interpreters_language_once_per_launch()
