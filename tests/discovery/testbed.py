"""Run a command inside a umockdev testbed whose devices can be unplugged and plugged again.

Usage (with Debian's python3, which has the UMockdev GI bindings)::

    /usr/bin/python3 tests/discovery/testbed.py --device a.umockdev ... -- COMMAND ...

Why a helper process: ``umockdev-run --device`` loads devices but cannot add or remove them
later, and our Python (pyenv) has no PyGObject. This helper builds the testbed with
``UMockdev.Testbed``, runs COMMAND with ``LD_PRELOAD=libumockdev-preload.so.0`` and
``UMOCKDEV_DIR`` (so pyudev in any Python sees only the mock /sys, /dev and uevents), and serves
requests on the unix socket named by ``HILFARM_TESTBED`` (one JSON object per line)::

    {"op": "add", "file": PATH}              load a record file, send "add" uevents (parents first)
    {"op": "remove", "file": PATH}           send "remove" uevents (children first), delete devices
    {"op": "remove_usb", "usb_path": "1-1.3"}   remove every loaded file on that USB port
    {"op": "present"}                        the loaded files
    {"op": "reset"}                          back to the --device files as started

The helper itself must run under the preload too: ``Testbed.uevent`` resolves the device
through libudev, which only finds the mock /sys through the preload (without it:
"uevent_sender_send: No such device"). It re-executes itself with the preload when needed.
It must not touch the real /sys or /dev, and stops serving when COMMAND exits.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

PRELOAD = "libumockdev-preload.so.0"


def record_paths(path):
    """The sysfs paths of a record file's devices, in file order (children first)."""
    with open(path, encoding="utf-8") as handle:
        return ["/sys" + line[3:].strip() for line in handle if line.startswith("P: ")]


def record_nodes(path):
    """The /dev names (relative, e.g. ttyUSB0) a record file creates with N: lines."""
    with open(path, encoding="utf-8") as handle:
        return [line[3:].split()[0] for line in handle if line.startswith("N: ")]


def usb_devices(syspath):
    return re.findall(r"/(\d+-\d+(?:\.\d+)*)(?=/|$)", syspath)


class Bed:
    def __init__(self, testbed, initial):
        self.testbed = testbed
        self.initial = list(initial)
        self.present = {}  # file -> sysfs paths
        self.saved = {}  # /dev node name -> its testbed entries, kept while it is unplugged
        self.root = testbed.get_root_dir()
        self.lock = threading.Lock()

    def node_entries(self, name):
        """The testbed's files for /dev/NAME: the node and umockdev's .node/.ptymap marks."""
        dev = os.path.join(self.root, "dev")
        entries = [os.path.join(dev, name), os.path.join(dev, ".node", name.replace("/", "_"))]
        node = os.path.join(dev, name)
        if os.path.islink(node):
            pty = os.readlink(node)
            entries.append(os.path.join(dev, ".ptymap", pty.replace("/", "_")))
        saved: list = []
        for entry in entries:
            if os.path.islink(entry):
                saved.append((entry, os.readlink(entry)))
            elif os.path.exists(entry):
                saved.append((entry, None))
        return saved

    def add(self, path, events=True):
        path = os.path.abspath(path)
        if path in self.present:
            return
        names = record_nodes(path)
        again = [name for name in names if name in self.saved]
        source = path
        if again:
            # umockdev 0.17 keeps a removed device's node (its PTY) registered and aborts when a
            # node of that name is created again ("assertion failed: !this.dev_fd.contains
            # (devname)"). So load the record without those N: lines and put the old node
            # entries back: the same PTY, as a real re-plug gets the same major:minor.
            source = os.path.join(self.root, "replug-" + os.path.basename(path))
            with open(path, encoding="utf-8") as src, open(source, "w", encoding="utf-8") as dst:
                dst.writelines(line for line in src
                               if not (line.startswith("N: ") and line[3:].split()[0] in again))
        if not self.testbed.add_from_file(source):
            raise RuntimeError(f"umockdev could not load {path}")
        for name in again:
            for entry, target in self.saved.pop(name):
                os.makedirs(os.path.dirname(entry), exist_ok=True)
                if not os.path.lexists(entry):
                    if target is None:
                        open(entry, "w").close()
                    else:
                        os.symlink(target, entry)
        paths = record_paths(path)
        self.present[path] = paths
        if events:
            for syspath in reversed(paths):  # the kernel announces parents first
                self.testbed.uevent(syspath, "add")

    def remove(self, path):
        path = os.path.abspath(path)
        paths = self.present.pop(path, None)
        if paths is None:
            return
        for syspath in paths:  # children first, as the kernel does on unplug
            self.testbed.uevent(syspath, "remove")
        for name in record_nodes(path):
            self.saved[name] = self.node_entries(name)
        for syspath in paths:
            self.testbed.remove_device(syspath)

    def remove_usb(self, usb_path):
        gone = []
        for path, paths in list(self.present.items()):
            names = {name for syspath in paths for name in usb_devices(syspath)}
            if any(n == usb_path or n.startswith(usb_path + ".") for n in names):
                self.remove(path)
                gone.append(path)
        return gone

    def reset(self):
        for path in list(self.present):
            if path not in self.initial:
                self.remove(path)
        for path in self.initial:
            self.add(path)

    def handle(self, request):
        op = request.get("op")
        with self.lock:
            if op == "add":
                self.add(request["file"])
            elif op == "remove":
                self.remove(request["file"])
            elif op == "remove_usb":
                return {"ok": True, "removed": self.remove_usb(request["usb_path"])}
            elif op == "reset":
                self.reset()
            elif op != "present":
                return {"ok": False, "error": f"unknown op {op!r}"}
            return {"ok": True, "present": sorted(self.present)}


def serve(bed, listener):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                request = json.loads(conn.makefile("r").readline() or "{}")
                answer = bed.handle(request)
            except Exception as exc:  # report to the caller instead of killing the server
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.sendall((json.dumps(answer) + "\n").encode())


def main(argv):
    if PRELOAD not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ, LD_PRELOAD=PRELOAD)
        os.execve(sys.executable, [sys.executable, *argv], env)
    args = argv[1:]
    if "--" not in args:
        print("usage: testbed.py [--device FILE]... -- COMMAND ...", file=sys.stderr)
        return 2
    split = args.index("--")
    options, command = args[:split], args[split + 1:]
    devices = [options[i + 1] for i, opt in enumerate(options) if opt == "--device"]

    import gi

    gi.require_version("UMockdev", "1.0")
    from gi.repository import UMockdev

    testbed = UMockdev.Testbed.new()
    root = testbed.get_root_dir()
    bed = Bed(testbed, [os.path.abspath(d) for d in devices])
    for device in bed.initial:
        bed.add(device, events=False)
    control = os.path.join(root, "hilfarm-testbed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(control)
    listener.listen(8)
    threading.Thread(target=serve, args=(bed, listener), daemon=True).start()
    env = dict(os.environ, UMOCKDEV_DIR=root, LD_PRELOAD=PRELOAD, HILFARM_TESTBED=control)
    try:
        return subprocess.call(command, env=env)
    finally:
        listener.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
