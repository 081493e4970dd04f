"""Hypothesis strategies for the requests of any RPC, derived from its proto descriptors (tests/unit/test_fuzz_api.py).

A strategy draws a *plan*: plain Python values per field (a dict for a message, a list for a repeated field or a
request stream) in which resources are named by symbolic tokens (`{{own:sandboxes}}`, `{{other:snapshots}}`...).
`build` turns a plan into the request once the tokens' names are known, so a failing plan replays and shrinks even
though the resources it names are made again between examples. Two tempers:
- tame: what a careful client sends (its own or another tenant's names, absolute paths, small numbers, known enum
  values, the header or config first in a stream), to get past validation into the services;
- wild: anything the wire allows (NUL bytes, huge and negative numbers, enum values out of range, oversized strings,
  maps and lists, tokens wrapped in junk).
Nothing here knows an RPC by name: a new RPC or field is fuzzed as soon as it is in the protos. Hints come from field
names (`path`, `*sandbox*`, `port`...) and the `google.api.http` path templates (`{name=sandboxes/*}`)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from google.api import annotations_pb2, field_behavior_pb2, resource_pb2
from google.protobuf import descriptor
from hypothesis import strategies as st

F = descriptor.FieldDescriptor
MAX_DEPTH = 4
COLLECTIONS = ("sandboxes", "snapshots", "nodes")
# Bare ids, as in CreateSandboxRequest.sandbox_id.
ID_COLLECTIONS = ("sandbox-id", "snapshot-id")
OWNERS = ("own", "other", "missing")
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_INTS = (0, 1, -1, 2, 7, 24, 64, 65, 80, 128, 255, 256, 0o644, 0o7777, 0o10000, 1000, 1001, 4096, 9999, 10000)
EDGE_INTS += (30000, 32767, 65535, 65536, 2**31 - 1, -(2**31), 2**32 - 1, 2**50, 2**50 + 1, 2**62, 2**63 - 1)
EDGE_INTS += (-(2**63), 2**64 - 1)
# Numbers a careful client sends, by what the field's name says it is.
TAME_INTS = {
    "port": (0, 22, 80, 8000, 30001, 65535),
    "mode": (0, 0o600, 0o644, 0o755, 0o7777),
    "page_size": (0, 1, 2, 1000),
    "count": (0, 1, 2),
    "vcpus": (0, 1, 2),
    "memory_mib": (0, 128, 256),
    "offset": (0, 1, 10),
    "length": (0, 1, 10),
    "cols": (0, 80, 200),
    "rows": (0, 24, 50),
    "signal": (0, 2, 9, 15, 28),
    "seconds": (0, 1, 60, 3600),
    "nanos": (0, 500_000_000),
}
NASTY_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\t",
    "/",
    "//",
    ".",
    "..",
    "/..",
    "/../..",
    "a/b",
    "*",
    "**",
    "%2F",
    "%00",
    "?x=1",
    "#",
    "sandboxes/",
    "snapshots/",
    "nodes/",
    "sandboxes/ABC",
    "sandboxes/a/b",
    "sandboxes/-a",
    "sandboxes/" + "a" * 64,
    "sandboxes/../snapshots/x",
    "snapshots/*",
    "nodes/*",
    "labels.a=b",
    "labels.=x",
    "labels.a=b labels.a=c",
    "labels.A=b",
    "0.0.0.0",
    "::",
    "127.0.0.1",
    "::1",
    "999.1.1.1",
    "10.0.0.0/33",
    "::/0",
    "fe80::1%eth0",
    "\u202e",
    "\ufeff",
    "\x7f",
    "é",
    "💥",
    "true",
    "-1",
    "NaN",
    "null",
    "{}",
    "eyJhbGciOiJub25lIn0",
    "AAAA",
    "1e309",
)
NASTY_PATHS = (
    "/",
    "//",
    "/.",
    "/..",
    "/../..",
    "/tmp/..",
    "/tmp/../../etc",
    "//tmp//fz",
    "relative",
    "./x",
    "",
    "/tmp/a\x00b",
    "/tmp/\n",
    "/tmp/fz/",
    "/proc/self/environ",
    "/dev/null",
    "/tmp/" + "a" * 300,
)
TAME_PATHS = ("/tmp/fz", "/tmp/fz/a", "/tmp", "/root", "/etc/hostname", "/tmp/fz-dir", "/tmp/fz-dir/f")
# Programs that end on their own and run nothing they are given (Exec runs on the test host under the fake VMM:
# never `env`, `sh`, `xargs`...), and names of none; arguments carry no shell syntax, so `shell: true` stays harmless.
PROGRAMS = ("true", "false", "echo", "printf", "pwd", "id", "uname", "no-such-program-fz", "/no/such/program")
SHELL_SYNTAX = ";&|`$()<>\n\r*?[]~{}'\"\\#!="


@dataclass(frozen=True)
class Huge:
    """`unit * count`, drawn as a constant (hypothesis need not generate, print or shrink megabytes)."""

    unit: object
    count: int

    def __repr__(self) -> str:
        return f"Huge({self.unit!r} * {self.count})"

    def value(self):
        return self.unit * self.count


HUGE_TEXT = (Huge("x", 5000), Huge("é", 70_000), Huge("/a", 3000), Huge("x", (1 << 20) + 1))
HUGE_BYTES = (Huge(b"x", (1 << 20) + 1), Huge(b"\x00", (4 << 20) + 1))


def token(owner: str, collection: str) -> str:
    return "{{" + f"{owner}:{collection}" + "}}"


def tokens_of(collection: str) -> list[str]:
    owners = ("own", "missing") if collection == "nodes" else OWNERS
    return [token(owner, collection) for owner in owners]


ALL_TOKENS = [t for c in COLLECTIONS + ID_COLLECTIONS for t in tokens_of(c)]
TOKEN = re.compile(r"\{\{[a-z]+:[a-z-]+\}\}")


def resolve(value, names: dict[str, str]):
    """A plan's scalar with its tokens replaced by the names they stand for, huge constants expanded."""
    if isinstance(value, Huge):
        value = value.value()
    if isinstance(value, str) and "{{" in value:
        return TOKEN.sub(lambda m: names.get(m.group(0), m.group(0)), value)
    return value


def is_map(field: F) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def http_rule(method: descriptor.MethodDescriptor):
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    return (verb, getattr(rule, verb), rule.body) if verb else None


def route_collections(method: descriptor.MethodDescriptor) -> dict[str, str]:
    """`{name=sandboxes/*}` in the method's HTTP path: its `name` names a sandbox."""
    rule = http_rule(method)
    found = {}
    for match in re.finditer(r"\{([a-z_.]+)=([a-z]+)/\*\}", rule[1] if rule else ""):
        found[match.group(1)] = match.group(2)
    return found


def resource_collection(message: descriptor.Descriptor) -> str | None:
    pattern = message.GetOptions().Extensions[resource_pb2.resource].pattern
    return pattern[0].split("/")[0] if pattern else None


class RequestStrategies:
    """Plans for the requests of one method: `plans()` draws (temper, plan), the plan being a list for a client
    stream."""

    def __init__(self, method: descriptor.MethodDescriptor) -> None:
        self.method = method
        self.hints = route_collections(method)
        # FieldMask paths a client might send: the fields of the messages the request carries.
        self.mask_paths = sorted(
            {
                inner.name
                for field in method.input_type.fields
                if field.type == F.TYPE_MESSAGE and not is_map(field)
                for inner in field.message_type.fields
            }
        )

    def plans(self) -> st.SearchStrategy:
        return st.one_of(self._plan("tame").map(lambda p: ("tame", p)), self._plan("wild").map(lambda p: ("wild", p)))

    def _plan(self, temper: str) -> st.SearchStrategy:
        message = self.method.input_type
        if not self.method.client_streaming:
            return self.message(message, temper, 0, "")
        if temper == "tame":  # the header or config first, then what may follow it
            first = self.message(message, temper, 0, "", place="lead")
            rest = st.lists(self.message(message, temper, 0, "", place="follow"), max_size=3)
            return st.builds(lambda head, tail: [head, *tail], first, rest)
        return st.lists(self.message(message, temper, 0, ""), max_size=5)

    def message(self, message: descriptor.Descriptor, temper: str, depth: int, prefix: str, place: str = ""):
        """A message's plan; `place` in a tame stream: "lead" sets the first message member of each oneof (the
        header or config), "follow" one of the others."""
        if depth > MAX_DEPTH:
            return st.just({})
        required, optional = {}, {}
        for field in message.fields:
            if field.containing_oneof is None or len(field.containing_oneof.fields) == 1:
                behaviors = set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])
                if temper == "tame" and field_behavior_pb2.OUTPUT_ONLY in behaviors:
                    continue  # a careful client leaves out what the server ignores
                needed = temper == "tame" and field_behavior_pb2.REQUIRED in behaviors
                (required if needed else optional)[field.name] = self.value(field, temper, depth, prefix)
        for oneof in message.oneofs:
            if len(oneof.fields) == 1:
                continue
            members = [st.tuples(st.just(f.name), self.value(f, temper, depth, prefix)) for f in oneof.fields]
            leading = [f for f in oneof.fields if f.type == F.TYPE_MESSAGE][:1]
            key = f"oneof:{oneof.name}"
            if place == "lead" and leading:
                required[key] = st.tuples(st.just(leading[0].name), self.value(leading[0], temper, depth, prefix))
            elif place == "follow":
                required[key] = st.one_of(
                    [
                        st.tuples(st.just(f.name), self.value(f, temper, depth, prefix))
                        for f in oneof.fields
                        if f not in leading
                    ]
                )
            else:
                optional[key] = st.one_of(members)
        return st.fixed_dictionaries(required, optional=optional)

    def value(self, field: F, temper: str, depth: int, prefix: str):
        path = f"{prefix}{field.name}"
        if is_map(field):
            entry = field.message_type
            keys = self.single(entry.fields_by_name["key"], temper, depth, path, map_key=True)
            values = self.single(entry.fields_by_name["value"], temper, depth + 1, path + ".")
            plans = st.dictionaries(keys, values, max_size=3 if temper == "tame" else 5)
            if temper == "wild":  # too many entries (a message value, e.g. a Timestamp, filled empty)
                filler = {} if entry.fields_by_name["value"].type == F.TYPE_MESSAGE else "v"
                plans |= st.just({f"k{i}": filler for i in range(70)})
            return plans
        if field.name == "argv":
            return self.argv(temper)
        single = self.single(field, temper, depth, path)
        if not field.is_repeated:
            return single
        lists = st.lists(single, max_size=2 if temper == "tame" else 5)
        if temper == "wild" and field.type != F.TYPE_MESSAGE:
            filler = {F.TYPE_STRING: "a", F.TYPE_BYTES: b"a", F.TYPE_BOOL: True}.get(field.type, 1)
            lists |= st.just(Huge([filler], 5000))
        return lists

    def single(self, field: F, temper: str, depth: int, path: str, map_key: bool = False):
        kind = field.type
        if kind == F.TYPE_MESSAGE:
            if field.message_type.full_name == "google.protobuf.FieldMask":
                names = st.sampled_from(self.mask_paths + ["*", "name", "labels.a", "no_such_field"])
                if temper == "wild":
                    names |= self.text(field, temper, path)
                return st.fixed_dictionaries({"paths": st.lists(names, max_size=3)})
            return self.message(field.message_type, temper, depth + 1, path + ".")
        if kind == F.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            if temper == "tame":
                return st.sampled_from(known)
            return st.sampled_from(known + [-1, max(known) + 1]) | st.integers(-(2**31), 2**31 - 1)
        if kind == F.TYPE_BOOL:
            return st.booleans()
        if kind == F.TYPE_BYTES:
            if temper == "tame":
                return st.binary(max_size=32)
            return st.binary(max_size=256) | st.sampled_from(HUGE_BYTES)
        if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return st.floats(-10, 10) if temper == "tame" else st.floats(width=32 if kind == F.TYPE_FLOAT else 64)
        if kind == F.TYPE_STRING:
            if map_key and temper == "tame":
                return st.from_regex(r"\A[a-z][a-z0-9_-]{0,8}\Z")
            return self.text(field, temper, path)
        low, high = INT_RANGES[kind]
        if temper == "tame":
            usual = next((v for k, v in TAME_INTS.items() if k in field.name), None)
            return st.sampled_from(usual) if usual else st.integers(0, 100)
        return st.sampled_from([v for v in EDGE_INTS if low <= v <= high]) | st.integers(low, high)

    def collection(self, field: F, path: str) -> str | None:
        """What a string field names, if a resource: from the HTTP path, the resource's pattern, or its name."""
        if path in self.hints:
            return self.hints[path]
        name = field.name
        if name == "name":
            return resource_collection(field.containing_type)
        if "snapshot" in name:
            return "snapshot-id" if name.endswith("_id") else "snapshots"
        if "sandbox" in name:
            return "sandbox-id" if name.endswith("_id") else "sandboxes"
        if name == "node" or name.endswith("_node"):
            return "nodes"
        return None

    def text(self, field: F, temper: str, path: str):
        name = field.name
        collection = self.collection(field, path)
        if temper == "tame":
            if collection:
                own, *others = tokens_of(collection)
                return st.sampled_from([own, own, *others])
            if name == "cwd":
                return st.sampled_from(("", "/", "/tmp", "/root"))
            if name in ("path", "source", "destination") or name.endswith("_path"):
                return st.sampled_from(TAME_PATHS)
            tame = {
                "template": ("default", "", "no-such-template"),
                "host_address": ("", "127.0.0.1"),
                "cidr": ("10.0.0.0/8", "203.0.113.0/24", "::/0"),
                "filter": ("", "labels.a=b"),
                "user": ("", "root", "0", "nobody"),
            }.get(name)
            if tame:
                return st.sampled_from(tame)
            return st.from_regex(r"\A[a-z0-9-]{0,8}\Z")
        wrapped = st.builds(
            lambda before, middle, after: before + middle + after,
            st.sampled_from(["", " ", "sandboxes/", "snapshots/", "x"]),
            st.sampled_from(ALL_TOKENS),
            st.sampled_from(["", "\n", "/x", ":exec", "\x00", "/.."]),
        )
        choices = [
            st.sampled_from(ALL_TOKENS),
            wrapped,
            st.sampled_from(NASTY_TEXT + NASTY_PATHS),
            st.text(max_size=30),
            st.sampled_from(HUGE_TEXT),
        ]
        if collection:
            choices.insert(0, st.sampled_from(tokens_of(collection)))
        return st.one_of(choices)

    def argv(self, temper: str):
        if temper == "tame":
            argument = st.text(st.sampled_from(string.ascii_letters + string.digits + " -_.,/:@%+"), max_size=12)
        else:
            argument = st.text(
                st.characters(blacklist_characters=SHELL_SYNTAX, blacklist_categories=("Cs",)), max_size=12
            )
        command = st.builds(
            lambda program, args: [program, *args], st.sampled_from(PROGRAMS), st.lists(argument, max_size=3)
        )
        if temper == "tame":
            return command
        oddities = st.sampled_from(
            [[], [""], ["echo\x00x"], ["echo", "a\x00b"], Huge(["echo"], 4097), ["echo", Huge("a", (128 << 10) + 1)]]
        )
        return command | oddities


def build(message_class, plan, names: dict[str, str]):
    """The request message of `plan`, tokens resolved (a list of messages for a stream's plan)."""
    if isinstance(plan, list):
        return [build(message_class, item, names) for item in plan]
    message = message_class()
    fill(message, plan, names)
    return message


def fill(message, plan: dict, names: dict[str, str]) -> None:
    for key, value in plan.items():
        name = key
        if key.startswith("oneof:"):
            name, value = value
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            for map_key, item in value.items():
                map_key = resolve(map_key, names)
                if value_field.type == F.TYPE_MESSAGE:
                    fill(target[map_key], item, names)
                else:
                    target[map_key] = resolve(item, names)
        elif field.is_repeated:
            items = resolve(value, names) if isinstance(value, Huge) else value
            for item in items:
                if field.type == F.TYPE_MESSAGE:
                    fill(target.add(), item, names)
                else:
                    target.append(resolve(item, names))
        elif field.type == F.TYPE_MESSAGE:
            target.SetInParent()
            fill(target, value, names)
        else:
            setattr(message, name, resolve(value, names))


def mentions(plan, prefix: str) -> bool:
    """Whether `plan` uses a token of `prefix` (e.g. `{{other:`) anywhere."""
    return prefix in repr(plan)


def printable_ascii() -> st.SearchStrategy[str]:
    return st.text(st.sampled_from(string.printable.strip() + " "), max_size=40)
