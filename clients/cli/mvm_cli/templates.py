"""`mvm template` (also `mvm templates`): what sandboxes can be created from, and the templates users build.

template [ls]             the templates (ListTemplates): tags, owner, warm, disk, nodes
template build            build one from a recipe or a Dockerfile (mvm_cli.template_build)
template show NAME        one template: tags, pool size, ..., and its newest builds
template rm NAME...       delete templates (--force: even while sandboxes use them)
template logs REF         a build's log: NAME (its newest build), NAME:TAG or NAME/BUILD; --follow
"""

from __future__ import annotations

import json
import re
import sys

from microvm.sandbox.v1 import template_pb2, template_service_pb2
from microvm_sandbox import BuildProgress, TemplateBuildFailed, TemplateInUse
from microvm_sandbox.templates import build_ref, template_name
from mvm_cli import template_build
from mvm_cli.context import Context, for_each
from mvm_cli.output import ago, as_dict, emit, error_line, fields, short, size_text, table, to_json, when
from mvm_cli.parsing import CliError, add_json, add_listing, command_parser

COLUMNS = ("TEMPLATE", "TAGS", "OWNER", "WARM", "DISK", "NODES", "WARM SIZES")
BUILD_COLUMNS = ("BUILD", "STATE", "TAGS", "SOURCE", "BASE", "CREATED", "TOOK", "FAILURE")


def owner(template: template_pb2.Template) -> str:
    if template.builtin:
        return "builtin"
    return short(template.owner) if template.owner else "public"


def tags_text(template: template_pb2.Template) -> str:
    return ",".join(f"{tag}={build}" for tag, build in sorted(template.tags.items())) or "-"


def row(template: template_pb2.Template) -> list[object]:
    return [
        short(template.name),
        ",".join(sorted(template.tags)) or "-",
        owner(template),
        "yes" if template.warm else "no",
        size_text(template.disk_bytes),
        ",".join(sorted(template.nodes)) or "-",
        ",".join(template.warm_sizes) or "-",
    ]


def build_state(build: template_pb2.TemplateBuild) -> str:
    return template_pb2.TemplateBuildState.Name(build.state).removeprefix("TEMPLATE_BUILD_STATE_")


def took(build: template_pb2.TemplateBuild) -> str:
    if not (build.end_time.seconds and build.create_time.seconds):
        return "-"
    return f"{(build.end_time.ToMilliseconds() - build.create_time.ToMilliseconds()) / 1000:.1f}s"


def build_table(builds, header: bool = True, now: float | None = None) -> str:
    rows = [
        [
            build.name.rsplit("/", 1)[-1],
            build_state(build),
            ",".join(build.tags) or "-",
            build.source or "-",
            build.base or "-",
            ago(build.create_time, now),
            took(build),
            build.failure_reason or "-",
        ]
        for build in builds
    ]
    return table(BUILD_COLUMNS, rows, header)


def moment(stamp, now: float | None = None) -> str:
    return f"{when(stamp)} ({ago(stamp, now)})" if stamp.seconds else "-"


def template_view(template: template_pb2.Template, now: float | None = None) -> str:
    """Every field of one template, one a line."""
    return fields(
        [
            ("name", short(template.name)),
            ("description", template.description or "-"),
            ("owner", owner(template)),
            ("tags", tags_text(template)),
            ("pool size", template.pool_size if template.HasField("pool_size") else "default"),
            ("warm", ",".join(template.warm_sizes) if template.warm else "no"),
            ("nodes", ",".join(sorted(template.nodes)) or "-"),
            ("disk", size_text(template.disk_bytes)),
            ("created", moment(template.create_time, now)),
            ("updated", moment(template.update_time, now)),
        ]
    )


def register(sub) -> None:
    template = command_parser(
        sub,
        "template",
        "build, list, show and delete templates",
        "mvm template build -f mvm.yaml .\nmvm template ls\nmvm create --template web:v1",
        description=__doc__.split("\n", 1)[1],
        aliases=["templates"],
    )
    add_listing(template, "names")
    template.set_defaults(handler=list_command)
    actions = template.add_subparsers(dest="action", metavar="{build,ls,show,rm,logs,tag,untag}")
    template_build.register(actions)
    ls = command_parser(
        actions,
        "ls",
        "list the templates sandboxes can be created from",
        "mvm template ls --json",
        description="List the templates sandboxes can be created from (`mvm create --template NAME[:TAG]`): their "
        "tags, owner (builtin, public, or your tenant), whether a create restores a booted guest (warm), the root "
        "filesystem's size and the nodes that have it.",
        aliases=["list"],
    )
    add_listing(ls, "names", keep=True)
    ls.set_defaults(handler=list_command)

    show = command_parser(actions, "show", "show one template and its newest builds", "mvm template show web")
    show.add_argument("template", metavar="TEMPLATE", help="the template's name")
    show.add_argument("--builds", type=int, default=10, metavar="N", help="how many of its newest builds to list")
    add_json(show)
    show.set_defaults(handler=show_command)

    rm = command_parser(actions, "rm", "delete templates and their builds", "mvm template rm web", aliases=["delete"])
    rm.add_argument("templates", nargs="+", metavar="TEMPLATE", help="template names")
    rm.add_argument("--force", action="store_true", help="delete even while sandboxes or snapshots use it")
    rm.set_defaults(handler=rm_command)

    logs = command_parser(
        actions,
        "logs",
        "print a build's log",
        "mvm template logs web --follow\nmvm template logs web/b-1a2b3c",
        description="Print a build's log (its newest 64 KiB): TEMPLATE for its newest build, TEMPLATE:TAG for the "
        "build a tag names, TEMPLATE/BUILD for one build. --follow prints a running build's output from its start "
        "and then as it comes until the build ends, and exits 1 if it failed.",
    )
    logs.add_argument("build", metavar="TEMPLATE[/BUILD]", help="the build")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the build until it ends")
    logs.set_defaults(handler=logs_command)

    tag = command_parser(
        actions,
        "tag",
        "point tags at a build",
        "mvm template tag web b1a2b3c4d5e6 stable prod\nmvm template tag web v1 stable",
        description="Point tags at a succeeded build of TEMPLATE: BUILD is a build id or a tag naming it now. A tag "
        "that named another build moves; all of them move at once. `mvm create --template TEMPLATE:TAG` then boots it.",
    )
    tag.add_argument("template", metavar="TEMPLATE", help="the template's name")
    tag.add_argument("build", metavar="BUILD", help="a build id (b…) or a tag of the template")
    tag.add_argument("tags", nargs="+", metavar="TAG", help="tags to point at it")
    tag.set_defaults(handler=tag_command)

    untag = command_parser(actions, "untag", "remove tags from a template", "mvm template untag web stable")
    untag.add_argument("template", metavar="TEMPLATE", help="the template's name")
    untag.add_argument("tags", nargs="+", metavar="TAG", help="tags to remove (its builds stay)")
    untag.set_defaults(handler=untag_command)


def list_command(ctx: Context, args) -> int:
    found = ctx.client.templates.list()
    if args.json:
        emit(to_json(found))
    elif args.quiet:
        emit("\n".join(short(t.name) for t in found))
    else:
        emit(table(COLUMNS, [row(t) for t in found], header=not args.no_headers))
    return 0


def show_command(ctx: Context, args) -> int:
    found = ctx.client.templates.get(args.template)
    builds = [] if found.builtin else ctx.client.templates.list_builds(args.template, limit=args.builds)
    if args.json:
        emit(json.dumps({"template": as_dict(found), "builds": [as_dict(b) for b in builds]}, indent=2))
        return 0
    emit(template_view(found))
    if builds:
        emit("\n" + build_table(builds))
    return 0


def rm_command(ctx: Context, args) -> int:
    def delete(name: str) -> str:
        try:
            ctx.client.templates.delete(name, force=args.force)
        except TemplateInUse as error:
            raise CliError(f"{error_line(error)} (--force deletes it anyway)", status=1) from None
        return f"deleted {short(template_name(name))}"

    return for_each(args.templates, delete, "template rm", noun="template")


def tag_command(ctx: Context, args) -> int:
    is_id = re.fullmatch(r"b[0-9a-f]{12}", args.build) is not None
    source = f"{args.template}/{args.build}" if is_id else f"{args.template}:{args.build}"
    build = ctx.client.templates.find_build(source).name
    found = ctx.client.templates.assign_tags(build, args.tags)
    emit(f"{short(found.name)}: {', '.join(args.tags)} -> {build_ref(build)}")
    return 0


def untag_command(ctx: Context, args) -> int:
    found = ctx.client.templates.remove_tags(args.template, args.tags)
    emit(f"{short(found.name)}: removed {', '.join(args.tags)}; tags now {tags_text(found) or 'none'}")
    return 0


def logs_command(ctx: Context, args) -> int:
    build = ctx.client.templates.find_build(args.build).name
    out = sys.stdout.buffer
    if not args.follow:
        out.write(ctx.client.templates.get_build_log(build))
        out.flush()
        return 0
    progress = BuildProgress()
    with ctx.client.templates.watch(build) as stream:  # a running build's output from its start, then live
        for event in stream:
            progress.add(event)
            if isinstance(event, template_service_pb2.BuildLog):
                out.write(event.data)
                out.flush()
    try:
        progress.result()
    except TemplateBuildFailed as failure:
        print(f"mvm: {failure}", file=sys.stderr)
        return 1
    print(f"mvm: build {build_ref(build)} succeeded", file=sys.stderr)
    return 0
