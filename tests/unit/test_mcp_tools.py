"""The MCP server's tools are the ones docs/quickstart-agents.md names, no more and no fewer, each described."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart-agents.md"


def documented_tools() -> list[str]:
    """The names in the quickstart's `Tools: a, b (notes), c.` sentence."""
    sentence = re.search(r"Tools: (.*?)\.\n", DOC.read_text(), re.S)
    assert sentence, "docs/quickstart-agents.md lists no tools"
    return [re.sub(r"\(.*?\)", "", name).strip() for name in " ".join(sentence.group(1).split()).split(",")]


async def test_the_server_has_exactly_the_documented_tools():
    from microvm_mcp.server import server

    tools = await server.list_tools()
    names = [tool.name for tool in tools]
    assert len(names) == len(documented_tools()) == 32
    assert sorted(names) == sorted(documented_tools())
    assert all(tool.description for tool in tools)
    assert all(prop.get("description") for tool in tools for prop in tool.input_schema.get("properties", {}).values())
