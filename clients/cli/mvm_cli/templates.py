"""`mvm templates`: what sandboxes can be created from (ListTemplates), as the nodes report them."""

from __future__ import annotations

from microvm.sandbox.v1 import template_pb2
from mvm_cli.context import Context
from mvm_cli.output import emit, short, size_text, table, to_json
from mvm_cli.parsing import add_listing, command_parser

COLUMNS = ("TEMPLATE", "WARM", "DISK", "NODES", "WARM SIZES")


def row(template: template_pb2.Template) -> list[object]:
    return [
        short(template.name),
        "yes" if template.warm else "no",
        size_text(template.disk_bytes),
        ",".join(sorted(template.nodes)) or "-",
        ",".join(template.warm_sizes) or "-",
    ]


def register(sub) -> None:
    templates = command_parser(
        sub,
        "templates",
        "list the templates sandboxes can be created from",
        "mvm templates --json",
        description="List the templates sandboxes can be created from (`mvm create --template NAME`): the nodes "
        "that have each one's image built, whether a create there restores a booted guest (warm), and the root "
        "filesystem's size (the most a sandbox's disk can grow to).",
    )
    add_listing(templates, "names")
    templates.set_defaults(handler=templates_command)


def templates_command(ctx: Context, args) -> int:
    found = ctx.client.list_templates()
    if args.json:
        emit(to_json(found))
    elif args.quiet:
        emit("\n".join(short(t.name) for t in found))
    else:
        emit(table(COLUMNS, [row(t) for t in found], header=not args.no_headers))
    return 0
