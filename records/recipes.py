"""The recipes this repository can run: the default (train_gpt.py at the root) and the earlier records kept
runnable under records/, each importable by path for the tools and tests that compare or test them."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "train_gpt.py"
RECORD21 = REPO / "records" / "track_1_short" / "2025-02-01_Record21" / "train_gpt.py"


def load_recipe(path: Path, module_name: str | None = None) -> ModuleType:
    """The recipe file at path as a module (imported once per name; a recipe under records/ gets a name of its
    own, so it never shadows the default train_gpt)."""
    path = Path(path).resolve()
    name = module_name or ("train_gpt" if path == DEFAULT else f"recipe_{path.parent.name.replace('-', '_')}")
    if name in sys.modules:
        return sys.modules[name]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def record21() -> ModuleType:
    return load_recipe(RECORD21)
