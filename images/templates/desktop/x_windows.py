"""Top-level windows as the window manager sees them (EWMH: _NET_CLIENT_LIST, _NET_ACTIVE_WINDOW), and focusing
and closing one the way a person would, through the window manager. Without an EWMH window manager: the mapped
children of the root window, focused with XSetInputFocus, closed with WM_DELETE_WINDOW. Runs on the X thread."""

from desktop_base import Refused
from Xlib import X, Xatom, display, error
from Xlib.protocol import event

ROOT_MESSAGE_MASK = X.SubstructureRedirectMask | X.SubstructureNotifyMask


def _atom(conn: display.Display, name: str) -> int:
    return conn.intern_atom(name)


def _property(conn: display.Display, window, name: str, kind=X.AnyPropertyType):
    with_value = window.get_full_property(_atom(conn, name), kind)
    return with_value.value if with_value is not None else None


def _supported(conn: display.Display, name: str) -> bool:
    supported = _property(conn, conn.screen().root, "_NET_SUPPORTED", Xatom.ATOM)
    return supported is not None and _atom(conn, name) in list(supported)


def _client_ids(conn: display.Display) -> list[int]:
    root = conn.screen().root
    clients = _property(conn, root, "_NET_CLIENT_LIST", Xatom.WINDOW)
    if clients is not None:
        return [int(window_id) for window_id in clients]
    ids = []
    for child in root.query_tree().children:
        attributes = child.get_attributes()
        if attributes.map_state == X.IsViewable and not attributes.override_redirect:
            ids.append(child.id)
    return ids


def _title(conn: display.Display, window) -> str:
    name = _property(conn, window, "_NET_WM_NAME", _atom(conn, "UTF8_STRING"))
    if name is None:
        name = _property(conn, window, "WM_NAME")
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return name or ""


def _active(conn: display.Display) -> int | None:
    active = _property(conn, conn.screen().root, "_NET_ACTIVE_WINDOW", Xatom.WINDOW)
    if active:
        return int(active[0])
    focus = conn.get_input_focus().focus
    return focus.id if hasattr(focus, "id") else None


def list_windows(conn: display.Display) -> list[dict]:
    """[{"id", "title", "pid"?, "x", "y", "width", "height", "focused"}] in the window manager's order."""
    root = conn.screen().root
    active = _active(conn)
    windows = []
    for window_id in _client_ids(conn):
        window = conn.create_resource_object("window", window_id)
        try:
            geometry = window.get_geometry()
            origin = root.translate_coords(window, 0, 0)
            described = {
                "id": window_id,
                "title": _title(conn, window),
                "x": origin.x,
                "y": origin.y,
                "width": geometry.width,
                "height": geometry.height,
                "focused": window_id == active,
            }
            pid = _property(conn, window, "_NET_WM_PID", Xatom.CARDINAL)
            if pid:
                described["pid"] = int(pid[0])
        except (error.BadWindow, error.BadDrawable):
            continue  # closed while we looked
        windows.append(described)
    return windows


def _known(conn: display.Display, window_id) -> object:
    if isinstance(window_id, bool) or not isinstance(window_id, int):
        raise Refused("bad_request", f"id is a window id (an integer from `windows`), not {window_id!r}")
    if window_id not in _client_ids(conn):
        raise Refused("not_found", f"no window {window_id} (list them with `windows`)")
    return conn.create_resource_object("window", window_id)


def _send_to_root(conn: display.Display, window, message: str, data: list[int]) -> None:
    message_event = event.ClientMessage(
        window=window, client_type=_atom(conn, message), data=(32, (data + [0] * 5)[:5])
    )
    conn.screen().root.send_event(message_event, event_mask=ROOT_MESSAGE_MASK)
    conn.sync()


def focus(conn: display.Display, window_id) -> None:
    """Raises and focuses the window (un-minimizing it): _NET_ACTIVE_WINDOW from a pager, else XSetInputFocus."""
    window = _known(conn, window_id)
    if _supported(conn, "_NET_ACTIVE_WINDOW"):
        _send_to_root(conn, window, "_NET_ACTIVE_WINDOW", [2, X.CurrentTime, 0])
    else:
        window.configure(stack_mode=X.Above)
        window.set_input_focus(X.RevertToParent, X.CurrentTime)
        conn.sync()


def close(conn: display.Display, window_id) -> str:
    """Asks the window to close as its close button would: _NET_CLOSE_WINDOW through the window manager, else
    WM_DELETE_WINDOW; a window that takes neither is disconnected (XKillClient). Returns which one was used."""
    window = _known(conn, window_id)
    if _supported(conn, "_NET_CLOSE_WINDOW"):
        _send_to_root(conn, window, "_NET_CLOSE_WINDOW", [X.CurrentTime, 2])
        return "_NET_CLOSE_WINDOW"
    protocols = _property(conn, window, "WM_PROTOCOLS", Xatom.ATOM)
    delete = _atom(conn, "WM_DELETE_WINDOW")
    if protocols is not None and delete in list(protocols):
        message = event.ClientMessage(
            window=window, client_type=_atom(conn, "WM_PROTOCOLS"), data=(32, [delete, X.CurrentTime, 0, 0, 0])
        )
        window.send_event(message)
        conn.sync()
        return "WM_DELETE_WINDOW"
    conn.kill_client(window.id)
    conn.sync()
    return "XKillClient"
