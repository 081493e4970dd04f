"""The fake VMM's serial port: its standard input (the fake guest's console output) served on a unix socket the way
QEMU serves `-chardev socket,server=on,wait=off`: one client at a time gets what is written while it is connected,
the next waits until it leaves, and while none is connected the output is dropped. It ends when its input does
(the fake guest is gone). Standard library only: the fake VMM runs it as `python fake_serial.py SOCKET`.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    events = selectors.DefaultSelector()
    events.register(sys.stdin.fileno(), selectors.EVENT_READ, "output")
    client: socket.socket | None = None

    def take_client() -> None:
        """The next client waiting, else listen for one (while one is connected, the next waits in the backlog,
        as with QEMU)."""
        nonlocal client
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            events.register(listener, selectors.EVENT_READ, "listener")
            return
        client.setblocking(True)
        events.register(client, selectors.EVENT_READ, "client")

    def hang_up() -> None:
        nonlocal client
        events.unregister(client)
        client.close()
        client = None
        take_client()

    take_client()
    while True:
        # Clients first: output goes to whoever is connected once their news is known.
        for key, _ in sorted(events.select(), key=lambda event: event[0].data == "output"):
            if key.data == "listener":
                events.unregister(listener)
                take_client()
            elif key.data == "client":
                try:
                    typed = client.recv(4096)  # console input: the fake guest has no serial line to read it
                except OSError:
                    typed = b""
                if not typed:
                    hang_up()
            else:
                output = os.read(sys.stdin.fileno(), 1 << 16)
                if not output:
                    return
                if client is not None:
                    try:
                        client.sendall(output)
                    except OSError:
                        hang_up()


if __name__ == "__main__":
    serve(sys.argv[1])
