"""A `bash` context: one persistent `bash --norc --noprofile` per context, so variables, functions, the working
directory and exported variables persist between runs. (Debian packages no Jupyter bash kernel.)

A run writes its code to a file in the context's private directory and sends the shell, on its stdin, a few lines:
`source` that file with stdin from /dev/null (the code cannot read the server's lines), then print the run's marker
with `$?` on stdout and the marker on stderr. A SIGINT to the shell's process group ends the foreground command; the
shell's INT trap then returns from the `source`, so the rest of the code does not run, and the shell lives on. The
trap is set again after every run: bash keeps SIGINT from reaching a trap again once a trap has returned from
waiting on a command, until the trap is set anew. Code that sets its own INT trap replaces it for that run.

Exit status: non-zero status of the code's last command gives a `CommandFailed` error ("exit status N") and status
"error". A per-run env exports the variables in the shell for the run and then puts back what `declare -p` had
printed for them before (unsetting those that were unset); names must be shell identifiers.
"""

import asyncio
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from context_base import Refused, error_event
from process_context import ProcessContext

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INT_TRAP = "builtin trap 'builtin return 130 2>/dev/null' INT"
BASH = shutil.which("bash") or "/bin/bash"


def bash_available() -> bool:
    return os.access(BASH, os.X_OK)


@dataclass
class BashContext(ProcessContext):
    kind_name: str = "bash shell"
    directory: str | None = None  # private: the file each run's code is written to

    def check_env(self, env: dict[str, str]) -> None:
        for name in env:
            if not IDENTIFIER.fullmatch(name):
                raise Refused("bad_request", f"env name {name!r} is not a shell variable name")

    async def spawn(self) -> asyncio.subprocess.Process:
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix=f"mvm-bash-{self.id}-")
        process = await asyncio.create_subprocess_exec(
            BASH,
            "--norc",
            "--noprofile",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        process.stdin.write(f"{INT_TRAP}\n".encode())
        return process

    async def stop(self) -> None:
        await super().stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    async def send_run(self, code: str, marker: str, env: dict[str, str]) -> None:
        cell = Path(self.directory) / "cell"
        cell.write_text(code if code.endswith("\n") or not code else code + "\n")
        lines = []
        if env:
            names = " ".join(sorted(env))
            lines.append(f"__mvm_env_saved=$(builtin declare -p {names} 2>/dev/null)")
            lines += [f"builtin export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
        lines += [f"builtin source {shlex.quote(str(cell))} </dev/null", "__mvm_status=$?"]
        if env:
            lines.append(f'builtin unset {names}; builtin eval "$__mvm_env_saved"; builtin unset __mvm_env_saved')
        lines += [
            INT_TRAP,
            f"builtin printf '%s %s\\n' {marker} \"$__mvm_status\"; builtin printf '%s\\n' {marker} >&2",
            "builtin unset __mvm_status",
        ]
        self.process.stdin.write(("\n".join(lines) + "\n").encode())
        await self.process.stdin.drain()

    def finish(self, trailer: str, timed_out: bool) -> tuple[str, list[dict]]:
        try:
            code = int(trailer.strip())
        except ValueError:
            code = -1
        if code == 0:
            return "ok", []
        if self.interrupted and code == 130:
            if timed_out:
                return "error", []  # the TimeoutError said it
            return "error", [error_event("Interrupted", "the code was interrupted (SIGINT); the shell keeps its state")]
        return "error", [error_event("CommandFailed", f"exit status {code}")]
