"""What a power cut would leave of the agent's data directory: an strace parser, an ext4 model, a checker.

SIGKILL keeps every write the kernel accepted; a power cut keeps only what reached the disk.
``tests/device_agent/test_power_loss.py`` runs a real agent under ``strace`` and hands the trace
to this module, which replays the file-system calls made under the data directory on a model
of the disk and checks that every journal step is durable before the next one begins.

The model (``DiskModel``) follows the rules ``runtime/durable.py`` documents for ext4 with
default options, and nothing friendlier:

* a file's data is durable only after ``fsync``/``fdatasync`` of that file (through any
  descriptor) that returned after the write returned; ``O_TRUNC`` and ``ftruncate`` count as writes;
* a name created, renamed or removed in a directory is durable only after ``fsync`` of that
  directory; until then a power cut finds the directory's previous entry (the old file, or nothing);
* ``rename`` is atomic: the cut finds the old inode or the new one under the name, never a mix.

Each call takes effect when it returns (a call strace split around another thread's lines is
placed where it returned). The orders the checker demands are between calls of one thread (the
OTA worker writes the journal, unpacks, downloads, and queues the events that report its
transitions), whose calls never overlap, so ordering by return is exact for them; an fsync made
by any thread counts, as it would on the disk. The tree found before the trace is taken as durable.

The checker (``check``) walks the calls in order and reports, naming the trace line:

* ``fsync-before-rename``: a rename into place (to a name not starting with ``.``) whose source
  still holds unsynced data, or (a directory: the staged slot) any file or directory entry
  inside it that is not durable;
* ``dir-fsync-before-next-step``: a rename into place whose directory was not fsynced before the
  next journal step began (the creation of the next ``.state.json.*.tmp``), or never;
* ``journal-before-events``: after a rename onto ``state.json``, a write to ``outbox.sqlite*``
  by the same thread (the event reporting the step) before the data directory was fsynced;
* ``slot-durable-before-journal``: a ``state.json`` version that makes slot X active, or records
  a package in slot X, while ``slots/X`` is not durably in place (every name and byte in it);
* ``download-durable-before-journal``: a ``state.json`` version that enters VERIFYING while
  ``downloads/<deployment>.edgepkg`` is not durably in place.

Which version of ``state.json`` does what? Counting renames between markers or matching them
to the fleet's events cannot say it: the active pointer and slot records change in saves that
report no transition (``_do_activate`` saves ``active`` after ACTIVATING was journaled). So the
trace prints written bytes up to ``STRING_LIMIT`` (the journal is a few KiB; package bytes,
cut at that limit, are not needed) and the checker reads each version of the journal from the
writes to its temporary file. A journal write cut by the limit raises ``TraceError`` rather than
being guessed at. The test then matches the journaled states with the events the fleet got.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRING_LIMIT = 16384  # bytes of each written buffer the trace keeps: the journal is ~3 KiB
# "?" lets strace skip the legacy calls an architecture does not have (aarch64 has no open/rename/...).
TRACED = (
    "openat",
    "?open",
    "?creat",
    "write",
    "pwrite64",
    "writev",
    "pwritev",
    "pwritev2",
    "fsync",
    "fdatasync",
    "?rename",
    "renameat",
    "renameat2",
    "?unlink",
    "unlinkat",
    "?mkdir",
    "mkdirat",
    "?rmdir",
    "close",
    "ftruncate",
    "?symlink",
    "symlinkat",
    "?link",
    "linkat",
)
WRITES = frozenset({"write", "pwrite64", "writev", "pwritev", "pwritev2"})
SYNCS = frozenset({"fsync", "fdatasync"})
JOURNAL = "state.json"
_JOURNAL_TMP = re.compile(r"^\.state\.json\..+\.tmp$")
_OUTBOX = "outbox.sqlite"


class TraceError(Exception):
    """The trace cannot be read, or lacks something the checker needs (a journal write cut short)."""


def strace_command(output: Path, *, strace: str = "strace") -> list[str]:
    """The strace prefix that records every call this module understands, of every thread and child, to ``output``."""
    return [
        strace,
        "-f",
        "-qq",
        "-tt",
        "-y",
        "-s",
        str(STRING_LIMIT),
        "--seccomp-bpf",  # only the traced calls stop the agent: inference keeps its speed
        "-e",
        "signal=none",
        "-e",
        "trace=" + ",".join(TRACED),
        "-o",
        str(output),
    ]


def find_strace() -> str | None:
    """The strace binary (on PATH, or /usr/bin/strace where PATH lacks /usr/bin), or None."""
    return shutil.which("strace") or ("/usr/bin/strace" if os.access("/usr/bin/strace", os.X_OK) else None)


def strace_problem(strace: str | None = None) -> str | None:
    """Why strace cannot trace here (missing, or ptrace refused), or None when it can."""
    path = strace or find_strace()
    if path is None or not os.access(path, os.X_OK):
        return "strace is not installed (make test installs it with mosquitto: apt-get install strace)"
    probe = subprocess.run(
        [*strace_command(Path(os.devnull), strace=path), "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"strace cannot trace a child here (ptrace refused?): {probe.stderr.strip()[:200]}"
    return None


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Fd:
    """A descriptor argument as ``strace -y`` prints it: number and the path it referred to."""

    number: str
    path: str | None
    deleted: bool = False


@dataclass(frozen=True)
class Text:
    """A string argument as strace printed it; ``cut`` when it printed only the first ``STRING_LIMIT`` bytes."""

    escaped: str
    cut: bool = False

    @property
    def data(self) -> bytes:
        """The bytes (decoded on demand: most written data is never looked at)."""
        return _unescape(self.escaped)


Arg = Fd | Text | str


@dataclass(frozen=True)
class Syscall:
    """One completed call: where it is in the trace, who made it, what it was given and returned."""

    line: int  # line of the trace (1-based) where the call returned
    start_line: int  # line where it began (differs when strace split it: "<unfinished ...>")
    tid: int
    time: str
    name: str
    args: tuple[Arg, ...]
    result: int | None
    result_path: str | None
    errno: str | None
    text: str

    @property
    def ok(self) -> bool:
        return self.errno is None and self.result is not None and self.result >= 0

    def excerpt(self, width: int = 220) -> str:
        text = f"{self.tid} {self.time} {self.text}"
        return text if len(text) <= width else text[: width - 3] + "..."

    def fd(self) -> Fd | None:
        first = self.args[0] if self.args else None
        return first if isinstance(first, Fd) else None


_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<time>\d\d:\d\d:\d\d(?:\.\d+)?)\s+(?P<body>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>(?P<rest>.*)$")
_UNFINISHED = " <unfinished ...>"
# strace 6.1 prints an unlinked file as "3</tmp/x>(deleted)", others as "3</tmp/x (deleted)>".
_FD = re.compile(r"^(?P<num>-?\d+|AT_FDCWD)<(?P<path>.*)>(?P<deleted>\(deleted\))?$", re.S)
_RESULT = re.compile(
    r"^(?P<num>-?\d+|0x[0-9a-f]+)(?:<(?P<path>.*?)>(?P<deleted>\(deleted\))?)?(?:\s+(?P<errno>E[A-Z0-9]+)\b.*)?$"
)
_DELETED = " (deleted)"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def parse_trace(text: str) -> list[Syscall]:
    """Every completed call of an ``strace -f -tt -y`` trace (``strace_command``), in the order they returned.

    A call strace split across threads (``<unfinished ...>`` / ``<... resumed>``) is joined and
    placed where it returned. Signals, exits and calls that never returned are left out.
    Raises ``TraceError`` on a line it cannot read.
    """
    calls: list[Syscall] = []
    pending: dict[int, tuple[int, str, str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        match = _LINE.match(raw)
        if match is None:
            raise TraceError(f"trace line {number} is not an strace -f -tt line: {raw[:200]!r}")
        tid, stamp, body = int(match["tid"]), match["time"], match["body"]
        if body.startswith(("+++", "---")):
            continue
        resumed = _RESUMED.match(body)
        if resumed is not None:
            if tid not in pending:
                continue  # began before the trace did
            start, start_stamp, head = pending.pop(tid)
            body, stamp = head + resumed["rest"], start_stamp
        else:
            start = number
        if body.endswith(_UNFINISHED):
            pending[tid] = (start, stamp, body[: -len(_UNFINISHED)])
            continue
        try:
            name, args, result = _split_call(body)
        except ValueError as exc:
            raise TraceError(f"trace line {number}: {exc}: {raw[:200]!r}") from None
        if result.startswith("?"):
            continue  # the thread died inside the call
        r = _RESULT.match(result)
        if r is None:
            raise TraceError(f"trace line {number}: cannot read the result {result!r}")
        value = int(r["num"], 0)
        calls.append(
            Syscall(
                line=number,
                start_line=start,
                tid=tid,
                time=stamp,
                name=name,
                args=tuple(_arg(a) for a in args),
                result=value,
                result_path=None if r["deleted"] or (r["path"] or "").endswith(_DELETED) else r["path"],
                errno=r["errno"],
                text=body,
            )
        )
    return calls


def _split_call(body: str) -> tuple[str, list[str], str]:
    """``name(a, b, c) = result`` -> (name, [a, b, c], result), respecting strings, brackets and ``<path>``."""
    open_at = body.find("(")
    if open_at <= 0:
        raise ValueError("no call")
    name = body[:open_at]
    args: list[str] = []
    depth, i, start, n = 0, open_at + 1, open_at + 1, len(body)
    while i < n:
        c = body[i]
        if c == '"':
            string = _STRING.match(body, i)
            if string is None:
                raise ValueError("unclosed string")
            i = string.end() - 1
        elif c == "<" and (body[i - 1].isdigit() or body[start:i].strip() == "AT_FDCWD"):
            close = body.find(">", i)
            if close < 0:
                raise ValueError("unclosed <path>")
            i = close
        elif c in "[{(":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == ")":
            if depth == 0:
                tail = body[start:i].strip()
                if tail or args:
                    args.append(tail)
                rest = body[i + 1 :].strip()
                if not rest.startswith("="):
                    raise ValueError("no result")
                return name, args, rest[1:].strip()
            depth -= 1
        elif c == "," and depth == 0:
            args.append(body[start:i].strip())
            start = i + 1
        i += 1
    raise ValueError("unbalanced call")


def _arg(raw: str) -> Arg:
    fd = _FD.match(raw)
    if fd is not None:
        path = fd["path"]
        deleted = bool(fd["deleted"]) or path.endswith(_DELETED)
        if path.endswith(_DELETED):
            path = path[: -len(_DELETED)]
        return Fd(fd["num"], path, deleted)
    if raw.startswith('"'):
        cut = raw.endswith('"...')
        body = raw[1:-4] if cut else raw[1:-1]
        return Text(body, cut)
    return raw


_SIMPLE = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "e": 27}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)", re.S)


def _unescape(body: str) -> bytes:
    """Decode strace's C-style string escapes (``\\n``, ``\\"``, ``\\x7f``, octal ``\\0``/``\\377``)."""

    def one(m: re.Match[str]) -> str:
        e = m[1]
        if e[0] == "x":
            return chr(int(e[1:], 16))
        if e[0] in "01234567":
            return chr(int(e, 8) & 0xFF)
        return chr(_SIMPLE[e]) if e in _SIMPLE else e

    # strace prints only ASCII (everything else is escaped), so latin-1 maps characters to bytes one to one.
    return _ESCAPE.sub(one, body).encode("latin-1", "replace")


# ----------------------------------------------------------------------------- what a call touches


@dataclass(frozen=True)
class Effect:
    """A call reduced to what it does to the file system; paths are absolute and normalized."""

    kind: str  # open | write | sync | rename | exchange | remove | mkdir | link | none
    path: str | None = None
    dest: str | None = None
    create: bool = False
    truncate: bool = False
    data: Text | None = None


def effect(call: Syscall, cwd: str | None = None) -> Effect:
    """What ``call`` does to the file system (``kind="none"`` for failed calls and ``close``)."""
    if not call.ok:
        return Effect("none")
    a, name = call.args, call.name

    def at(dirfd: Arg, path: Arg) -> str | None:
        if not isinstance(path, Text):
            return None
        p = path.data.decode(errors="replace")
        if os.path.isabs(p):
            return os.path.normpath(p)
        base = dirfd.path if isinstance(dirfd, Fd) else cwd
        return os.path.normpath(os.path.join(base, p)) if base else None

    def fd_path() -> str | None:
        fd = call.fd()
        return None if fd is None or fd.deleted or fd.path is None else os.path.normpath(fd.path)

    if name in ("openat", "open", "creat"):
        if name == "openat":
            flags = a[2] if len(a) > 2 else ""
            path = at(a[0], a[1])
        else:
            flags = "O_CREAT|O_WRONLY|O_TRUNC" if name == "creat" else (a[1] if len(a) > 1 else "")
            path = at("AT_FDCWD", a[0])
        if call.result_path is not None:
            path = os.path.normpath(call.result_path)
        flags = flags if isinstance(flags, str) else ""
        return Effect("open", path, create="O_CREAT" in flags, truncate="O_TRUNC" in flags)
    if name in WRITES:
        data = a[1] if name in ("write", "pwrite64") and len(a) > 1 and isinstance(a[1], Text) else None
        return Effect("write", fd_path(), data=data) if call.result else Effect("none")
    if name == "ftruncate":
        return Effect("write", fd_path(), truncate=True)
    if name in SYNCS:
        return Effect("sync", fd_path())
    if name in ("rename", "renameat", "renameat2"):
        if name == "rename":
            old, new = at("AT_FDCWD", a[0]), at("AT_FDCWD", a[1])
        else:
            old, new = at(a[0], a[1]), at(a[2], a[3])
        exchange = name == "renameat2" and len(a) > 4 and "RENAME_EXCHANGE" in str(a[4])
        return Effect("exchange" if exchange else "rename", old, new)
    if name in ("unlink", "rmdir"):
        return Effect("remove", at("AT_FDCWD", a[0]))
    if name == "unlinkat":
        return Effect("remove", at(a[0], a[1]))
    if name == "mkdir":
        return Effect("mkdir", at("AT_FDCWD", a[0]))
    if name == "mkdirat":
        return Effect("mkdir", at(a[0], a[1]))
    if name == "symlink":
        return Effect("link", at("AT_FDCWD", a[1]))
    if name == "symlinkat":
        return Effect("link", at(a[1], a[2]))
    if name == "link":
        return Effect("link", at("AT_FDCWD", a[1]), dest=at("AT_FDCWD", a[0]))
    if name == "linkat":
        return Effect("link", at(a[2], a[3]), dest=at(a[0], a[1]))
    return Effect("none")


# ----------------------------------------------------------------------------- the disk model


def scan_tree(root: str | os.PathLike[str]) -> dict[str, str]:
    """The tree under ``root`` as ``relative path -> "file" | "dir"`` (what ``DiskModel`` starts from)."""
    tree: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            tree[os.path.normpath(os.path.join(rel, d))] = "dir"
        for f in filenames:
            tree[os.path.normpath(os.path.join(rel, f))] = "file"
    return tree


class Node:
    """A file or directory (an inode). ``entries``: its names now; ``durable``: what a power cut would find."""

    def __init__(self, kind: str, origin: str) -> None:
        self.kind = kind  # file | dir | link
        self.origin = origin  # "before the trace" or "line N" (for messages)
        self.entries: dict[str, Node] = {}
        self.durable: dict[str, Node] = {}
        self.changed: dict[str, Syscall] = {}  # names changed since the last fsync of this directory
        self.dirty: Syscall | None = None  # first write not yet fsynced
        self.synced_by: Syscall | None = None  # the last fsync that made a change durable
        self.content: bytearray | None = None  # kept for journal temporary files
        self.content_cut: Syscall | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} from {self.origin}>"


@dataclass(frozen=True)
class Survivor:
    """What a power cut would find under one name: which inode (by origin) and whether its bytes are all there."""

    origin: str
    kind: str
    intact: bool


class DiskModel:
    """The data directory as ext4 would keep it through a power cut, updated call by call.

    Built from the tree found before the trace began (``relpath -> "file" | "dir"``), all of it
    taken as durable. ``apply`` replays one call; ``problems`` says why a path would not
    survive a cut intact; ``power_cut`` lists what a cut right now would leave.
    """

    def __init__(self, root: str | os.PathLike[str], tree: Mapping[str, str] | None = None) -> None:
        self.root = os.path.normpath(os.fspath(root))
        self.top = Node("dir", "before the trace")
        self.notes: list[str] = []
        tree = tree or {}
        for rel in sorted(tree, key=lambda r: r.count("/")):
            parent = self._node(os.path.dirname(rel))
            if parent is not None:
                node = Node(tree[rel], "before the trace")
                parent.entries[os.path.basename(rel)] = node
                parent.durable[os.path.basename(rel)] = node

    @classmethod
    def scan(cls, root: str | os.PathLike[str]) -> DiskModel:
        """A model of the tree now under ``root`` (taken as durable: it was there before the trace)."""
        return cls(root, scan_tree(root))

    # -- paths

    def rel(self, path: str) -> str | None:
        """``path`` relative to the root, or None when it is outside."""
        if path == self.root:
            return "."
        if path.startswith(self.root + os.sep):
            return path[len(self.root) + 1 :]
        return None

    def _node(self, rel: str) -> Node | None:
        node = self.top
        for part in [] if rel in (".", "") else rel.split(os.sep):
            child = node.entries.get(part)
            if child is None:
                return None
            node = child
        return node

    def lookup(self, path: str) -> Node | None:
        rel = self.rel(path)
        return None if rel is None else self._node(rel)

    def _parent(self, path: str, call: Syscall) -> tuple[Node, str] | None:
        rel = self.rel(path)
        if rel is None or rel == ".":
            return None
        parent = self._node(os.path.dirname(rel))
        if parent is None or parent.kind != "dir":
            self.notes.append(f"line {call.line}: {rel}: parent unknown to the model; call ignored")
            return None
        return parent, os.path.basename(rel)

    # -- replay

    def apply(self, call: Syscall, e: Effect | None = None) -> None:
        """Replay ``call`` (already reduced to ``e`` if given) on the model."""
        e = e if e is not None else effect(call)
        if e.kind == "none" or e.path is None or self.rel(e.path) is None:
            if e.kind in ("rename", "exchange") and e.dest is not None and self.rel(e.dest) is not None:
                self.notes.append(f"line {call.line}: rename into the data directory from outside; not modelled")
            return
        if e.kind == "open":
            node = self.lookup(e.path)
            if node is None and e.create:
                found = self._parent(e.path, call)
                if found is not None:
                    parent, name = found
                    node = Node("file", f"line {call.line}")
                    if _JOURNAL_TMP.match(name):
                        node.content = bytearray()
                    parent.entries[name] = node
                    parent.changed[name] = call
            elif node is not None and e.truncate and node.kind == "file":
                node.dirty = node.dirty or call
                if node.content is not None:
                    node.content.clear()
        elif e.kind == "write":
            node = self._known(e.path, call)
            if node is not None:
                node.dirty = node.dirty or call
                if node.content is not None:
                    if e.truncate:
                        node.content.clear()
                    elif e.data is not None and not e.data.cut and len(e.data.data) == call.result:
                        node.content += e.data.data
                    else:
                        node.content_cut = call
        elif e.kind == "sync":
            node = self._known(e.path, call)
            if node is not None:
                if node.dirty is not None or node.changed:
                    node.synced_by = call
                if node.kind == "dir":
                    node.durable = dict(node.entries)
                    node.changed.clear()
                node.dirty = None
        elif e.kind in ("rename", "exchange"):
            self._rename(call, e)
        elif e.kind == "remove":
            found = self._parent(e.path, call)
            if found is not None:
                parent, name = found
                parent.entries.pop(name, None)
                parent.changed[name] = call
        elif e.kind in ("mkdir", "link"):
            found = self._parent(e.path, call)
            if found is not None:
                parent, name = found
                source = self.lookup(e.dest) if e.dest is not None else None
                parent.entries[name] = source or Node("dir" if e.kind == "mkdir" else "link", f"line {call.line}")
                parent.changed[name] = call

    def _known(self, path: str, call: Syscall) -> Node | None:
        node = self.lookup(path)
        if node is None:
            # Opened before the trace or made by a call not traced: assume it was durable then.
            found = self._parent(path, call)
            if found is None:
                return None
            parent, name = found
            node = Node("file", "outside the trace")
            parent.entries[name] = parent.durable[name] = node
            self.notes.append(f"line {call.line}: {self.rel(path)} was not seen being created; taken as durable")
        return node

    def _rename(self, call: Syscall, e: Effect) -> None:
        assert e.path is not None and e.dest is not None
        src, dst = self._parent(e.path, call), self._parent(e.dest, call)
        if src is None or dst is None:
            return
        (sp, sn), (dp, dn) = src, dst
        node = sp.entries.get(sn)
        if node is None:
            self.notes.append(f"line {call.line}: rename of {self.rel(e.path)}, unknown to the model; ignored")
            return
        if e.kind == "exchange":
            other = dp.entries.get(dn)
            if other is None:
                return
            sp.entries[sn], dp.entries[dn] = other, node
        else:
            del sp.entries[sn]
            dp.entries[dn] = node
        sp.changed[sn] = call
        dp.changed[dn] = call

    # -- questions

    def problems(self, path: str, *, name_too: bool = True) -> list[str]:
        """Why ``path`` would not be found complete after a power cut now (empty: it would be).

        ``name_too``: also require the path's own name (and its ancestors') to be durable;
        without it only the contents count (the source of a rename, whose name is about to change).
        """
        rel = self.rel(path)
        if rel is None:
            return [f"{path} is outside the data directory"]
        node, here, out = self.top, ".", []
        for part in [] if rel == "." else rel.split(os.sep):
            child = node.entries.get(part)
            if child is None:
                return [f"{rel} does not exist"]
            sub = part if here == "." else f"{here}/{part}"
            if name_too and node.durable.get(part) is not child:
                why = node.changed.get(part)
                at = f" at line {why.line}" if why is not None else ""
                out.append(f"the name {sub} is not durable (made{at}; {here} not fsynced since)")
            node, here = child, sub
        out += self._contents(node, rel)
        return out

    def _contents(self, node: Node, rel: str) -> list[str]:
        out: list[str] = []
        if node.dirty is not None:
            out.append(f"{rel} has data written at line {node.dirty.line} and not fsynced since")
        if node.kind == "dir":
            for name in sorted(set(node.entries) | set(node.durable)):
                if node.entries.get(name) is not node.durable.get(name):
                    why = node.changed.get(name)
                    at = f" at line {why.line}" if why is not None else ""
                    out.append(f"the entry {rel}/{name} changed{at} and {rel} was not fsynced since")
            for name, child in sorted(node.entries.items()):
                out += self._contents(child, f"{rel}/{name}" if rel != "." else name)
        return out

    def syncs_of(self, path: str) -> list[Syscall]:
        """The fsyncs that made the contents of ``path`` durable (for a directory: of everything in it)."""
        node = self.lookup(path)
        out: list[Syscall] = []

        def walk(n: Node) -> None:
            if n.synced_by is not None:
                out.append(n.synced_by)
            for child in n.entries.values():
                walk(child)

        if node is not None:
            walk(node)
        return sorted(out, key=lambda c: c.line)

    def power_cut(self) -> dict[str, Survivor]:
        """What a power cut now would leave: relative path -> the inode found there and whether its data is all there."""
        out: dict[str, Survivor] = {}

        def walk(node: Node, rel: str) -> None:
            for name, child in sorted(node.durable.items()):
                sub = name if rel == "." else f"{rel}/{name}"
                out[sub] = Survivor(child.origin, child.kind, child.dirty is None)
                if child.kind == "dir":
                    walk(child, sub)

        walk(self.top, ".")
        return out


# ----------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Violation:
    rule: str
    call: Syscall
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] trace line {self.call.line}: {self.message}\n    {self.call.excerpt()}"


@dataclass
class JournalStep:
    """One version of ``state.json``: the rename that put it in place and what it says."""

    call: Syscall
    state: dict[str, Any]
    synced: Syscall | None = None  # the fsync of the data directory that made it durable

    @property
    def ota(self) -> dict[str, Any]:
        return self.state.get("ota") or {}


@dataclass
class Placement:
    """A rename into place, and the fsyncs that made it durable: of its contents before, of its directory after."""

    call: Syscall
    rel: str
    content_syncs: list[Syscall]
    dir_sync: Syscall | None = None
    exempt: str | None = None
    late: bool = False  # already reported: its directory was not fsynced in time

    @property
    def syncs(self) -> list[Syscall]:
        return self.content_syncs + ([self.dir_sync] if self.dir_sync is not None else [])


@dataclass
class Report:
    """What ``check`` found: violations (and those under exempted paths), the journal, counts."""

    calls: int = 0
    syncs: int = 0
    placements: list[Placement] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    exempted: list[tuple[Violation, str]] = field(default_factory=list)
    journal: list[JournalStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def states(self, deployment_id: str) -> list[str]:
        """The OTA states journaled for ``deployment_id``, in order, repeats collapsed (what the fleet hears)."""
        out: list[str] = []
        for step in self.journal:
            if step.ota.get("deployment_id") == deployment_id and (not out or out[-1] != step.ota.get("state")):
                out.append(str(step.ota.get("state")))
        return out

    def describe(self, limit: int = 25) -> str:
        lines = [
            f"{self.calls} calls under the data directory, {len(self.journal)} journal steps, "
            f"{len(self.placements)} renames into place, {self.syncs} fsyncs; "
            f"{len(self.violations)} violations, {len(self.exempted)} exempted"
        ]
        lines += [str(v) for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"... and {len(self.violations) - limit} more")
        return "\n".join(lines)


def check(
    calls: Iterable[Syscall],
    model: DiskModel,
    *,
    initial_journal: Mapping[str, Any] | None = None,
    exempt: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Report:
    """Replay ``calls`` on ``model`` and check the durability order of every journal step (module docstring).

    ``initial_journal``: ``state.json`` as it was before the trace. ``exempt``: relative path
    prefix -> reason; violations under it are listed in ``Report.exempted``, not failed.
    Raises ``TraceError`` when a journal version cannot be read from the trace.
    """
    report = Report()
    root = model.root
    exempt = exempt or {}
    previous: dict[str, Any] = dict(initial_journal or {})
    pending: list[Placement] = []  # renamed into place, directory not fsynced yet
    unsynced_journal: dict[int, JournalStep] = {}  # tid -> its last journal step not yet durable

    def fail(rule: str, call: Syscall, message: str, rel: str | None = None) -> None:
        violation = Violation(rule, call, message)
        reason = _exempt_reason(rel, exempt)
        if reason is not None:
            report.exempted.append((violation, reason))
        else:
            report.violations.append(violation)

    for call in calls:
        e = effect(call, cwd)
        rels = [model.rel(p) for p in (e.path, e.dest) if p is not None]
        if not any(r is not None for r in rels):
            continue
        report.calls += 1
        name = os.path.basename(e.path or "")
        parent = os.path.dirname(e.path or "")

        # A journal step begins: everything renamed into place before must be durable by now.
        if e.kind == "open" and e.create and parent == root and _JOURNAL_TMP.match(name):
            for p in pending:
                if not p.late:
                    p.late = True
                    fail(
                        "dir-fsync-before-next-step",
                        p.call,
                        f"{p.rel} was renamed into place here, but {os.path.dirname(p.rel) or '.'} was not fsynced "
                        f"before the next journal step began (trace line {call.line})",
                        p.rel,
                    )
        # The events that report a step are queued after it: the step must be durable by then.
        if e.kind == "write" and parent == root and name.startswith(_OUTBOX) and call.tid in unsynced_journal:
            step = unsynced_journal.pop(call.tid)
            fail(
                "journal-before-events",
                call,
                f"the thread queues an event in {name} while the journal step renamed at line {step.call.line} "
                "is not durable (data directory not fsynced since)",
            )
        placement: Placement | None = None
        if e.kind == "rename" and e.dest is not None and model.rel(e.dest) not in (None, "."):
            dest_rel = model.rel(e.dest)
            assert dest_rel is not None
            if not os.path.basename(e.dest).startswith("."):
                source = model.lookup(e.path) if e.path else None
                placement = Placement(
                    call, dest_rel, model.syncs_of(e.path or ""), exempt=_exempt_reason(dest_rel, exempt)
                )
                report.placements.append(placement)
                if source is not None:
                    for problem in model.problems(e.path or "", name_too=False):
                        fail(
                            "fsync-before-rename",
                            call,
                            f"{dest_rel} is put in place while {problem}",
                            dest_rel,
                        )
                if dest_rel == JOURNAL and source is not None:
                    state = _journal_version(call, source)
                    step = JournalStep(call, state)
                    _check_journal_step(step, previous, model, fail)
                    report.journal.append(step)
                    previous = state

        model.apply(call, e)

        if placement is not None:
            pending.append(placement)
            if placement.rel == JOURNAL and report.journal and report.journal[-1].call is call:
                unsynced_journal[call.tid] = report.journal[-1]
        if e.kind == "sync" and e.path is not None:
            report.syncs += 1
            node = model.lookup(e.path)
            if node is not None and node.kind == "dir":
                for p in pending:
                    if p.dir_sync is None and model.lookup(os.path.dirname(os.path.join(root, p.rel))) is node:
                        p.dir_sync = call
                pending = [p for p in pending if p.dir_sync is None]
                if e.path == root:
                    for step in unsynced_journal.values():
                        step.synced = call
                    unsynced_journal.clear()

    for p in pending:
        if p.late:
            continue
        fail(
            "dir-fsync-before-next-step",
            p.call,
            f"{p.rel} was renamed into place here and {os.path.dirname(p.rel) or '.'} was never fsynced afterwards",
            p.rel,
        )
    report.notes = list(model.notes)
    return report


def _exempt_reason(rel: str | None, exempt: Mapping[str, str]) -> str | None:
    if rel is None:
        return None
    return next((why for prefix, why in exempt.items() if rel == prefix.rstrip("/") or rel.startswith(prefix)), None)


def _journal_version(call: Syscall, source: Node) -> dict[str, Any]:
    if source.content_cut is not None:
        raise TraceError(
            f"the journal write at trace line {source.content_cut.line} is cut short in the trace; "
            f"raise syscall_trace.STRING_LIMIT (now {STRING_LIMIT})"
        )
    if source.content is None:
        raise TraceError(f"trace line {call.line}: the file renamed onto state.json was not created in the trace")
    try:
        state = json.loads(bytes(source.content))
    except ValueError as exc:
        raise TraceError(f"trace line {call.line}: the journal version put in place is not JSON ({exc})") from None
    if not isinstance(state, dict):
        raise TraceError(f"trace line {call.line}: the journal version put in place is not a JSON object")
    return state


def _check_journal_step(step: JournalStep, previous: Mapping[str, Any], model: DiskModel, fail: Any) -> None:
    """The journal may name a slot or a download only once it is durably in place."""
    state, root = step.state, model.root
    slots = state.get("slots") or {}
    before = previous.get("slots") or {}
    named: dict[str, str] = {}
    active = state.get("active")
    if active is not None and active != previous.get("active"):
        named[active] = f"makes slot {active} active"
    for slot, record in sorted(slots.items()):
        if record and record != before.get(slot) and slot not in named:
            named[slot] = f"records {record.get('name')} v{record.get('version')} in slot {slot}"
    for slot, what in named.items():
        for problem in model.problems(os.path.join(root, "slots", slot)):
            fail("slot-durable-before-journal", step.call, f"the journal {what} while {problem}")
    ota, was = state.get("ota") or {}, previous.get("ota") or {}
    entering = ota.get("state") != was.get("state") or ota.get("deployment_id") != was.get("deployment_id")
    if entering and ota.get("state") == "VERIFYING":
        download = os.path.join(root, "downloads", f"{ota.get('deployment_id')}.edgepkg")
        for problem in model.problems(download):
            fail("download-durable-before-journal", step.call, f"the journal enters VERIFYING while {problem}")


def read_trace(path: Path) -> list[Syscall]:
    """``parse_trace`` of a trace file."""
    return parse_trace(path.read_text(errors="replace"))


def touching(calls: Iterable[Syscall], root: str | os.PathLike[str], cwd: str | None = None) -> list[Syscall]:
    """The calls that touch something under ``root`` (what ``check`` looks at; replays are faster on these alone)."""
    top = os.path.normpath(os.fspath(root))
    inside = top + os.sep
    out = []
    for call in calls:
        e = effect(call, cwd)
        if any(p is not None and (p == top or p.startswith(inside)) for p in (e.path, e.dest)):
            out.append(call)
    return out
