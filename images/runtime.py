"""The agent's own runtime: a self-contained Python the guest agent runs on, whatever the image holds.

Built from this host's Debian python3 into one prefix that every root filesystem gets (the default image and any
image archive, Debian, Alpine/musl or without Python at all):

    /opt/microvm/agent.py, microvm_agent/, microvm/agent/, google/protobuf/   the agent and its protobuf runtime
    /opt/microvm/google/_upb/                                                   protobuf's C implementation (upb)
    /opt/microvm/runtime/bin/python3                                            the interpreter
    /opt/microvm/runtime/lib/ld-linux-x86-64.so.2, libc.so.6, ...               its ELF loader and every shared
                                                                                library it and its extensions load
    /opt/microvm/runtime/lib/python3.11/ (+ lib-dynload/)                       the stdlib the agent imports

The initramfs starts it through its own loader, `ld-linux-x86-64.so.2 --library-path /opt/microvm/runtime/lib
/opt/microvm/runtime/bin/python3 -I -S ...`: nothing goes through the environment (no LD_LIBRARY_PATH, and no
PYTHONHOME either, which -I ignores), so nothing leaks into the processes the agent starts; Python finds its prefix
from the interpreter's path (lib/python3.11/os.py and lib-dynload beside it). The image's own libraries are never
used by the agent, and the agent's are never seen by the image's programs.

The stdlib is what the agent's code imports, closed over every import statement of every module it reaches
(function-level and optional imports included, a package always whole), minus what it never needs (tests, idle,
tkinter, ensurepip, ...). The bundle is a cache stage keyed by the hash of every file it is made of.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from images.cache import cache_root, content_hash, run, stage, step

REPO = Path(__file__).resolve().parent.parent
RUNTIME_VERSION = "1"
HOST_PYTHON = "/usr/bin/python3"
AGENT_DIR = "opt/microvm"  # relative to a root filesystem
RUNTIME_DIR = f"{AGENT_DIR}/runtime"
LOADER = "ld-linux-x86-64.so.2"
# What a guest agent never imports, or must not: pruned (with its submodules) even when some module it reaches
# names it. ssl: asyncio imports
# it when present, which would load OpenSSL's TLS library at every agent start for nothing (the agent speaks no TLS).
PRUNED = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc",
        "pydoc_data",
        "doctest",
        "unittest",
        "distutils",
        "venv",
        "sqlite3",
        "_sqlite3",
        "dbm",
        "_dbm",
        "_gdbm",
        "curses",
        "_curses",
        "_curses_panel",
        "readline",
        "ssl",
        "_ssl",
        "_tkinter",
        "pdb",
        "numpy",
        # Reached only through paths the agent never takes: ProcessPoolExecutor (multiprocessing, xmlrpc, http),
        # distribution metadata lookups (email, csv), macOS version probes.
        "concurrent.futures.process",
        "importlib.metadata",
        "plistlib",
    }
)
SKIPPED_DIRS = frozenset({"__pycache__", "test", "tests", "idle_test"})
# Loaded by glibc itself at run time, never named by a DT_NEEDED: pthread_cancel/pthread_exit unwind through it.
DLOPENED = ("libgcc_s.so.1",)


def agent_payload_dirs() -> list[tuple[Path, str]]:
    """What the agent needs in the guest: its code, generated agent.v1 code, and protobuf's runtime with its C
    implementation (upb). Without upb protobuf falls back to pure Python: under TCG that cost each exec about a
    millisecond and a half of decoding and encoding frames (docs/guest-boot.md)."""
    import google._upb._message
    import google.protobuf

    protobuf_dir = Path(google.protobuf.__file__).parent
    return [
        (REPO / "guest_agents" / "linux" / "microvm_agent", "microvm_agent"),
        (REPO / "gen" / "python" / "microvm" / "agent", "microvm/agent"),
        (protobuf_dir, "google/protobuf"),
        (Path(google._upb._message.__file__).parent, "google/_upb"),
    ]


def payload_extensions(payload: list[tuple[Path, str]]) -> list[Path]:
    """The compiled extension modules among the payload (upb): their libraries go into the runtime too."""
    return sorted(p for source, _ in payload for p in _tree_files(source) if p.suffix == ".so")


def interpreter(python: str = HOST_PYTHON) -> dict:
    """Where `python` keeps its stdlib and extensions, and which modules it has built in."""
    probe = (
        "import json, sys, sysconfig; print(json.dumps({'executable': sys.executable, 'version': '%d.%d' % "
        "sys.version_info[:2], 'stdlib': sysconfig.get_path('stdlib'), 'dynload': sysconfig.get_path('platstdlib') "
        "+ '/lib-dynload', 'ext_suffix': sysconfig.get_config_var('EXT_SUFFIX'), 'builtin': "
        "sorted(sys.builtin_module_names)}))"
    )
    info = json.loads(run([python, "-I", "-S", "-c", probe], capture_output=True, text=True).stdout)
    info["executable"] = os.path.realpath(info["executable"])
    return info


def _imports(source: Path, module: str = "", is_package: bool = False) -> set[str]:
    """Dotted names that `source` (module `module`) may import, wherever the statement sits (functions, try
    blocks): each with its parents, and `from X import y` as both X and X.y (y may be a submodule)."""
    try:
        tree = ast.parse(source.read_bytes(), str(source))
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()

    def add(name: str, imported: list[str] = ()) -> None:
        parts = name.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        names.update(f"{name}.{item}" for item in imported if item != "*")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            imported = [alias.name for alias in node.names]
            if node.level == 0:
                add(node.module, imported)
            elif module:  # relative: only within the stdlib, whose module names are known
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                if base:
                    add(".".join(base + ([node.module] if node.module else [])), imported)
    return names


def _python_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".py" else []
    return sorted(p for p in path.rglob("*.py") if not SKIPPED_DIRS & set(p.parts))


def stdlib_closure(info: dict, roots: list[Path]) -> tuple[list[Path], list[Path]]:
    """The stdlib modules (.py files) and extension modules (.so) that the code under `roots` can import."""
    stdlib, dynload = Path(info["stdlib"]), Path(info["dynload"])
    builtin = set(info["builtin"])

    def resolve(name: str) -> Path | None:
        parts = name.split(".")
        if parts[0] in builtin or any(".".join(parts[: i + 1]) in PRUNED for i in range(len(parts))):
            return None
        path = stdlib.joinpath(*parts)
        for candidate in (path / "__init__.py", path.with_name(f"{parts[-1]}.py")):
            if candidate.is_file():
                return candidate
        extension = dynload / f"{name}{info['ext_suffix']}"
        return extension if len(parts) == 1 and extension.is_file() else None

    # Python needs these before any import statement runs: os is the prefix's landmark, and codecs are looked up
    # by name at run time (so encodings is taken whole).
    found: dict[str, Path] = {}
    pending: list[tuple[Path, str]] = [(f, "") for root in roots for f in _python_files(root)]
    encodings = {("encodings." + f.stem).removesuffix(".__init__"): f for f in _python_files(stdlib / "encodings")}
    pending += [(file, name) for name, file in encodings.items()]
    wanted = {"os", "encodings"}
    scanned: set[Path] = set()
    while pending or wanted:
        for file, module in pending:
            if file not in scanned:
                scanned.add(file)
                wanted |= _imports(file, module, file.name == "__init__.py")
        pending = []
        for name in sorted(wanted - set(found)):
            if file := resolve(name):
                found[name] = file
                if file.suffix == ".py":
                    pending.append((file, name))
        wanted = set()
    found |= encodings
    modules = sorted({p for p in found.values() if p.suffix == ".py"})
    extensions = sorted({p for p in found.values() if p.suffix != ".py"})
    return modules, extensions


def shared_libraries(binaries: list[Path]) -> dict[str, Path]:
    """soname -> file of every library `binaries` load (ldd's closure), the ELF loader as LOADER."""
    libraries: dict[str, Path] = {}
    for binary in binaries:
        output = run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in output.splitlines():
            if match := re.match(r"\s*(\S+) => (/\S+) \(", line):
                libraries[match.group(1)] = Path(os.path.realpath(match.group(2)))
            elif (match := re.match(r"\s*(/\S+) \(", line)) and Path(match.group(1)).name == LOADER:
                libraries[LOADER] = Path(os.path.realpath(match.group(1)))
            elif "not found" in line:
                raise SystemExit(f"runtime: {binary} needs a library ldd cannot find: {line.strip()}")
    for name in DLOPENED:
        for directory in {p.parent for p in libraries.values()}:
            if (directory / name).exists():
                libraries[name] = Path(os.path.realpath(directory / name))
                break
    if LOADER not in libraries:
        raise SystemExit(f"runtime: no {LOADER} among what {binaries[0]} loads")
    return libraries


def bundle_files(python: str = HOST_PYTHON) -> list[tuple[Path, str]]:
    """(source, destination relative to the root filesystem) of every file of the bundle, agent included."""
    info = interpreter(python)
    payload = agent_payload_dirs()
    modules, extensions = stdlib_closure(info, [source for source, _ in payload])
    executable = Path(info["executable"])
    stdlib_dest = f"{RUNTIME_DIR}/lib/python{info['version']}"
    files = [(executable, f"{RUNTIME_DIR}/bin/python3")]
    for soname, library in sorted(shared_libraries([executable, *extensions, *payload_extensions(payload)]).items()):
        files.append((library, f"{RUNTIME_DIR}/lib/{soname}"))
    for extension in extensions:
        files.append((extension, f"{stdlib_dest}/lib-dynload/{extension.name}"))
    stdlib = Path(info["stdlib"])
    for module in modules:
        files += [(f, f"{stdlib_dest}/{f.relative_to(stdlib)}") for f in _tree_files(module)]
    for source, target in payload:
        files += [(f, f"{AGENT_DIR}/{target}/{f.relative_to(source)}") for f in _tree_files(source)]
    return files


def _tree_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix not in (".pyc", ".pyi") and not SKIPPED_DIRS & set(p.parts)
    )


SMOKE_IMPORTS = ("microvm_agent.main", "microvm_agent.archives", "microvm_agent.watch", "microvm_agent.background")
# The bundle must run protobuf's C implementation: the pure-Python fallback works, only slower, so it would go unseen.
SMOKE_CHECK = "from google.protobuf.internal import api_implementation; assert api_implementation.Type() == 'upb'"
AGENT_ENTRY = "import sys\nsys.path.insert(0, '/opt/microvm')\nfrom microvm_agent.main import main\nmain()\n"


def build_agent_runtime(python: str = HOST_PYTHON) -> Path:
    """The bundle's directory in the cache; its `opt/microvm` goes into a root filesystem as it is."""
    files = bundle_files(python)
    key = content_hash(RUNTIME_VERSION, Path(__file__), [dest for _, dest in files], *[src for src, _ in files])
    directory = cache_root() / "_agent_runtime" / key

    def build(work: Path) -> None:
        step(f"agent runtime: {len(files)} files from {python}")
        for source, dest in files:
            target = work / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            shutil.copymode(source, target)
        agent = work / AGENT_DIR
        for package in ("microvm", "google"):
            (agent / package / "__init__.py").touch()
        (agent / "microvm" / "agent" / "__init__.py").touch()
        (agent / "agent.py").write_text(AGENT_ENTRY)
        # Compiled by the interpreter the bundle is made of, with hashes that are never checked against the
        # sources (the guest does not even stat them at import), names as the guest sees them.
        compile_command = [python, "-I", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
        run([*compile_command, "-s", str(work), "-p", "/", str(agent)], stdout=subprocess.DEVNULL)
        # The bundle starts through its own loader and imports the whole agent: a missing module fails the build.
        smoke = f"import sys; sys.path.insert(0, {str(agent)!r}); import {', '.join(SMOKE_IMPORTS)}; {SMOKE_CHECK}"
        run([*runtime_command(work), "-c", smoke])
        (work / "size").write_text(str(sum(f.stat().st_size for f in work.rglob("*") if f.is_file())))

    return stage(directory, build)


def runtime_command(root: Path | str = "/") -> list[str]:
    """argv that starts the bundled python of the root filesystem at `root` (as the initramfs does at /)."""
    prefix = Path(root) / RUNTIME_DIR
    return [str(prefix / "lib" / LOADER), "--library-path", str(prefix / "lib"), str(prefix / "bin" / "python3")] + [
        "-I",
        "-S",
    ]


def install_agent_runtime(tree: Path, bundle: Path | None = None) -> None:
    """Puts the agent and its runtime into the root filesystem `tree`, replacing any earlier copy.

    `tree` may come from an untrusted image: /opt and /opt/microvm must be real directories (or absent), never
    symlinks, so nothing is written outside it."""
    bundle = bundle or build_agent_runtime()
    parent = tree
    for part in Path(AGENT_DIR).parent.parts:
        parent = parent / part
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise ValueError(f"/{parent.relative_to(tree)} in the image is not a directory")
        parent.mkdir(mode=0o755, exist_ok=True)
    target = tree / AGENT_DIR
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    run(["cp", "-a", "--reflink=auto", str(bundle / AGENT_DIR), str(target)])
