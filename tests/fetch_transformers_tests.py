"""
Puts transformers' common model tests, from the source distribution of the installed transformers version, into
`tests/.transformers_tests/` (git-ignored), where `tests/test_transformers_common.py` imports them.

The sdist ships `tests/test_modeling_common.py` and `tests/test_configuration_common.py` but none of the sub-packages
they import from (`tests/exporters`, `tests/generation`, `tests/utils`). Those three imports get small stand-ins:
  - `ExportTesterMixin` (base class of `ModelTesterMixin`): an empty mixin, so the `torch.export` tests do not run;
  - `GenerationTesterMixin`: an empty class the SALMONN tester does not inherit (its generate tests are not shipped);
  - `config_common_kwargs`: an empty dict; `ConfigTester` reads it only for configs without sub-configs.

Usage: `python tests/fetch_transformers_tests.py [--sdist PATH]` (without `--sdist`, pip downloads it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


CACHE_DIR = Path(__file__).resolve().parent / ".transformers_tests"
PACKAGE = "transformers_tests"
TEST_FILES = ("test_modeling_common.py", "test_configuration_common.py")
STAND_INS = {
    "exporters/test_export.py": (
        '"""Stand-in: the transformers sdist does not ship tests/exporters."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "generation/test_utils.py": (
        '"""Stand-in: the transformers sdist does not ship tests/generation."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stand-in: the transformers sdist does not ship tests/utils; only configs without sub-configs read it."""\n\n'
        "config_common_kwargs = {}\n"
    ),
}


def download_sdist(version: str, directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"transformers=={version}", "--dest", str(directory)],
        check=True,
    )
    return directory / f"transformers-{version}.tar.gz"


def extract(sdist: Path, version: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Writes the package into a temporary folder and moves it into place only when complete."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir))
    package = staging / PACKAGE
    package.mkdir()
    with tarfile.open(sdist) as archive:
        for name in TEST_FILES:
            member = f"transformers-{version}/tests/{name}"
            try:
                source = archive.extractfile(member)
            except KeyError:
                raise FileNotFoundError(f"{sdist} has no {member}") from None
            (package / name).write_bytes(source.read())
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    (package / "__init__.py").write_text(f'"""transformers {version} common tests."""\n\nVERSION = "{version}"\n')
    target = cache_dir / PACKAGE
    if target.exists():
        shutil.rmtree(target)
    package.rename(target)
    shutil.rmtree(staging)
    return target


def ensure_common_tests(cache_dir: Path = CACHE_DIR) -> Path:
    """The cached tests of the installed transformers, fetched first if missing or of another version."""
    version = transformers.__version__
    marker = cache_dir / PACKAGE / "__init__.py"
    if marker.is_file() and f'VERSION = "{version}"' in marker.read_text():
        return cache_dir / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        return extract(download_sdist(version, Path(tmp)), version, cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sdist", type=Path, help="a transformers-<version>.tar.gz already downloaded")
    args = parser.parse_args()
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(version, Path(tmp))
        target = extract(sdist, version)
    print(f"transformers {version} common tests in {target}")


if __name__ == "__main__":
    main()
