"""Contexts: every context of the server by id, the default one of each language, and which languages exist.

A language is run by the server itself where that works better than a Jupyter kernel Debian does not package:
`bash` (bash_context.py, when bash is installed) and `javascript`, alias `js` (node_context.py, when node is
installed). Every other language is a Jupyter kernelspec's (jupyter_context.py): `python` is ipykernel's.
"""

import asyncio
import os
import uuid

from bash_context import BashContext, bash_available
from context_base import Context, Refused, checked_env
from jupyter_context import JupyterContext, installed_kernels
from node_context import NodeContext, node_available

ALIASES = {"js": "javascript"}


class Contexts:
    def __init__(self, default_cwd: str):
        self.default_cwd = default_cwd
        self.kernels = installed_kernels()  # language -> kernelspec name
        self.built_in: dict[str, type[Context]] = {}
        if bash_available():
            self.built_in["bash"] = BashContext
        if node_available():
            self.built_in["javascript"] = NodeContext
        self.by_id: dict[str, Context] = {}
        self.starting: dict[str, asyncio.Lock] = {}  # default context id -> held while it starts

    def languages(self) -> list[str]:
        return sorted({*self.kernels, *self.built_in})

    def _language(self, language) -> str:
        """The canonical name of an available language, or Refused listing the available ones."""
        name = str(language or "python").lower()
        name = ALIASES.get(name, name)
        if name not in self.built_in and name not in self.kernels:
            available = self.languages()
            raise Refused(
                "unknown_language",
                f"no kernel for language {language!r}; installed: {', '.join(available)}",
                languages=available,
            )
        return name

    async def create(self, language="python", cwd=None, env=None, context_id=None) -> Context:
        language = self._language(language)
        env = checked_env(env)
        cwd = cwd or self.default_cwd
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            raise Refused("bad_request", f"cwd {cwd!r} is not a directory")
        context_id = context_id or uuid.uuid4().hex[:12]
        if language in self.built_in:
            context = self.built_in[language](context_id, language, cwd, env)
        else:
            context = JupyterContext(context_id, language, cwd, env, kernel_name=self.kernels[language])
        self.by_id[context.id] = context
        try:
            await context.start()
        except BaseException:
            self.by_id.pop(context.id, None)
            await context.stop()
            raise
        return context

    def get(self, context_id: str) -> Context:
        context = self.by_id.get(context_id)
        if context is None:
            raise Refused("context_not_found", f"no context {context_id!r}")
        return context

    async def default(self, language) -> Context:
        """`default` for python (started with the server), `default-<language>` for another, started on first use."""
        language = self._language(language)
        context_id = "default" if language == "python" else f"default-{language}"
        async with self.starting.setdefault(context_id, asyncio.Lock()):
            return self.by_id.get(context_id) or await self.create(language, context_id=context_id)

    async def delete(self, context_id: str) -> None:
        context = self.get(context_id)
        del self.by_id[context_id]
        await context.stop()

    async def close(self) -> None:
        contexts, self.by_id = list(self.by_id.values()), {}
        await asyncio.gather(*(context.stop() for context in contexts), return_exceptions=True)
