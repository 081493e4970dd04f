"""Key names for `press`: "ctrl+l", "Return", "alt+F4", "shift+Tab", "ctrl+shift+t", "a", "é".

A combination is key names joined by "+" (a literal plus is "plus"; "ctrl++" means ctrl and plus). A name is,
case-insensitively: an alias below (enter, esc, ctrl, alt, shift, super, cmd, ...), any X keysym name
(/usr/include/X11/keysymdef.h without the XK_ prefix: Return, BackSpace, Page_Up, F1..F35, XF86AudioMute, eacute),
or one character (any Unicode). Anything else is refused as unknown_key with close matches and the aliases.
"""

import difflib
import unicodedata

from desktop_base import Refused
from Xlib import XK

for _group in ("miscellany", "latin1", "latin2", "latin3", "latin4", "greek", "cyrillic", "technical", "special",
               "publishing", "xkb", "xf86"):  # fmt: skip
    XK.load_keysym_group(_group)

ALIASES = {
    "enter": "Return",
    "return": "Return",
    "esc": "Escape",
    "escape": "Escape",
    "ctrl": "Control_L",
    "control": "Control_L",
    "alt": "Alt_L",
    "option": "Alt_L",
    "shift": "Shift_L",
    "super": "Super_L",
    "win": "Super_L",
    "windows": "Super_L",
    "meta": "Super_L",
    "cmd": "Super_L",
    "command": "Super_L",
    "tab": "Tab",
    "backspace": "BackSpace",
    "delete": "Delete",
    "del": "Delete",
    "insert": "Insert",
    "ins": "Insert",
    "space": "space",
    "up": "Up",
    "down": "Down",
    "left": "Left",
    "right": "Right",
    "arrowup": "Up",
    "arrowdown": "Down",
    "arrowleft": "Left",
    "arrowright": "Right",
    "pageup": "Page_Up",
    "pgup": "Page_Up",
    "pagedown": "Page_Down",
    "pgdn": "Page_Down",
    "home": "Home",
    "end": "End",
    "capslock": "Caps_Lock",
    "numlock": "Num_Lock",
    "printscreen": "Print",
    "print": "Print",
    "menu": "Menu",
    "plus": "plus",
    "minus": "minus",
}
ALIAS_HINT = (
    "a key is an alias (enter, esc, ctrl, alt, shift, super, tab, backspace, delete, pageup, up, ...: all in "
    "`aliases`), an X keysym name (Return, Page_Up, F5: keysymdef.h without XK_), or one character"
)


def _keysym_names() -> dict[str, int]:
    names: dict[str, int] = {}
    for attribute in dir(XK):
        if attribute.startswith("XK_"):
            name = attribute[3:]
            if name.lower() not in names or name == name.lower():  # "eacute" wins over "Eacute"
                names[name.lower()] = getattr(XK, attribute)
    return names


KEYSYMS_BY_NAME = _keysym_names()


def char_keysym(char: str) -> int:
    """The keysym that types `char`: Latin-1 keysyms are the code point, the rest 0x01000000 + code point."""
    code = ord(char)
    if 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFF:
        return code
    return {"\n": XK.XK_Return, "\r": XK.XK_Return, "\t": XK.XK_Tab}.get(char, 0x01000000 | code)


def keysym_of(name: str) -> int:
    """One key name (see the module docstring) as a keysym; Refused("unknown_key") with suggestions otherwise."""
    if len(name) == 1 and unicodedata.category(name)[0] != "C":
        return char_keysym(name)
    exact = XK.string_to_keysym(name)
    if exact:
        return exact
    lowered = name.lower().replace(" ", "")
    if lowered in ALIASES:
        return XK.string_to_keysym(ALIASES[lowered])
    if lowered in KEYSYMS_BY_NAME:
        return KEYSYMS_BY_NAME[lowered]
    candidates = list(ALIASES) + [XK.keysym_to_string(k) or n for n, k in KEYSYMS_BY_NAME.items()]
    close = difflib.get_close_matches(name, candidates, n=8, cutoff=0.6)
    close += [c for c in difflib.get_close_matches(lowered, candidates, n=8, cutoff=0.6) if c not in close]
    raise Refused(
        "unknown_key",
        f"unknown key {name!r}" + (f"; did you mean {', '.join(close[:8])}?" if close else "") + f"; {ALIAS_HINT}",
        suggestions=close[:8],
        aliases=sorted(ALIASES),
    )


def parse_combo(combo: str) -> list[int]:
    """ "ctrl+shift+t" as keysyms in press order; Refused("bad_request") when empty, ("unknown_key") per name."""
    if not isinstance(combo, str) or not combo.strip():
        raise Refused("bad_request", "a key combination is a non-empty string such as 'ctrl+l' or 'Return'")
    if combo == "+":
        return [XK.XK_plus]
    parts = combo.split("+")
    if combo.endswith("++"):
        parts = combo[:-2].split("+") + ["plus"]
    if len(parts) > 8 or any(not part.strip() for part in parts):
        raise Refused("bad_request", f"{combo!r}: key names joined by '+', at most 8 (a plus key is 'plus')")
    return [keysym_of(part.strip()) for part in parts]


def parse_keys(keys) -> list[list[int]]:
    """`press`'s `keys`: one combination or a list of 1..100 of them, pressed one after the other."""
    combos = [keys] if isinstance(keys, str) else keys
    if not isinstance(combos, list) or not 1 <= len(combos) <= 100:
        raise Refused("bad_request", "keys is a combination ('ctrl+l') or a list of 1..100 of them")
    return [parse_combo(combo) for combo in combos]
