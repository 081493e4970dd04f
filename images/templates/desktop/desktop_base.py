"""What every desktop module shares: the refusal a request gets, and checks of request fields."""


class Refused(Exception):
    """A request the server will not carry out: sent as one line {"type": "error", "refused": true, "name", "value"}
    with `extra`'s fields beside them."""

    def __init__(self, name: str, value: str, **extra):
        super().__init__(value)
        self.name = name
        self.value = value
        self.extra = extra


def integer(request: dict, key: str, low: int, high: int, default=None) -> int:
    """request[key] as an int in low..high (a bool or float is refused); `default` when absent or null."""
    value = request.get(key)
    if value is None:
        if default is None:
            raise Refused("bad_request", f"{key} is required (an integer {low}..{high})")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Refused("bad_request", f"{key} is an integer {low}..{high}, not {value!r}")
    return value


def number(request: dict, key: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    """request[key] as a number in low..high (low excluded when `low_open`); `default` when absent or null."""
    value = request.get(key)
    if value is None:
        return default
    bounds = f"{'(' if low_open else '['}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refused("bad_request", f"{key} is a number in {bounds}, not {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise Refused("bad_request", f"{key} is a number in {bounds}, not {value!r}")
    return float(value)


def choice(request: dict, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = request.get(key, default) if request.get(key) is not None else default
    if value not in choices:
        raise Refused("bad_request", f"{key} is one of {', '.join(choices)}, not {value!r}")
    return value


def point(value, what: str, width: int, height: int) -> tuple[int, int]:
    """[x, y] (or a request's x and y) on a width x height screen: bad_request if not integers, off_screen if out."""
    if not (isinstance(value, list | tuple) and len(value) == 2) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise Refused("bad_request", f"{what} is a point [x, y] of integers, not {value!r}")
    x, y = value
    if not (0 <= x < width and 0 <= y < height):
        raise Refused("off_screen", f"{what} ({x}, {y}) is off the {width}x{height} screen", width=width, height=height)
    return x, y


def optional_point(request: dict, width: int, height: int) -> tuple[int, int] | None:
    """The request's x and y: both or neither (None)."""
    if request.get("x") is None and request.get("y") is None:
        return None
    return point([request.get("x"), request.get("y")], "x, y", width, height)


def region(value, width: int, height: int) -> tuple[int, int, int, int]:
    """[x, y, w, h] wholly on a width x height screen, w and h at least 1; the whole screen when None."""
    if value is None:
        return 0, 0, width, height
    if not (isinstance(value, list | tuple) and len(value) == 4) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise Refused("bad_request", f"region is [x, y, width, height] of integers, not {value!r}")
    x, y, w, h = value
    if w < 1 or h < 1:
        raise Refused("bad_request", f"region's width and height are at least 1, not {w}x{h}")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise Refused(
            "off_screen", f"region {value} is not wholly on the {width}x{height} screen", width=width, height=height
        )
    return x, y, w, h
