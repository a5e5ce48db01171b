"""The job's sockets: who may connect, how large a frame may be, and optional encryption.

Every ZeroMQ socket that crosses a process boundary is made here, so the same rules hold
on every port of a job::

    worker, watchdog, joiner (DEALER)           broker (ROUTER)              Gate (ZAP)
    ---------------------------------           ---------------              ----------
    connect: ZMTP greeting + handshake  ---->   handshake command  ------>  credentials of
             (PLAIN token, or CURVE keys)                                    this job?
                                        <----   accepted or closed  <-----  200 / 400
    messages (each HMAC-signed, see _protocol)  only after "accepted"

*Handshake.* The broker's socket runs a ZeroMQ security mechanism with a ZAP handler
(:class:`Gate`), so a connection carries no message at all until its peer proved it holds
the job's credentials. By default the mechanism is PLAIN with a token derived from the
job key: it gates connections but is not secret from someone who can read the network,
which is why every message is still signed (``_protocol``). With ``encrypt`` the
mechanism is CURVE: per-job key pairs, every byte encrypted, and only the job's client
key is let in.

*Frame size.* ZeroMQ reads a frame's length before its bytes; every socket refuses a
frame over :data:`scoop._protocol.MAX_FRAME_BYTES` and drops the connection at once, so no
one can make a process buffer a huge frame, before or after the handshake. Larger user
data still travels: ``_protocol`` splits it into frames of that size.

*Secrets.* The job key and the CURVE keys reach workers on their standard input, or in
a job file readable only by its owner (``scoop.join``); never on a command line. Workers
get the client key pair and the server's public key, never the server's secret key.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import resource
import socket
import struct
import time

import zmq
import zmq.utils.z85

from . import _protocol as P

log = logging.getLogger("scoop.broker")
P.BYTE_SIZED.add(zmq.Frame)  # a received frame is forwarded whole without _split's calls

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_DOMAIN = b"scoop"
PLAIN_USER = b"scoop"
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
# ZAP requests or monitor events taken per call: the broker's other work goes on meanwhile.
MAX_EVENTS_PER_CALL = 256
# A connection that has not finished the handshake after this long is dropped: each one
# holds a file descriptor of the broker's process. Ample for a worker on a loaded node (a
# handshake is two round trips and one check), short for idle connections left open.
HANDSHAKE_TIMEOUT_MS = 10_000
# Refused peers named in the log, one line each; the rest are only counted.
MAX_LOGGED_PEERS = 32
# Connections not yet proven to be this job's (accepted, and no signed first message read
# from them yet) that the broker keeps; beyond it the oldest is hung up. Each holds a file
# descriptor, so a flood of idle or unkeyed connections must not use them all: more lets
# more workers start at the same moment (those hung up reconnect), fewer keeps more
# descriptors for the job. The broker raises it for jobs of many workers.
MAX_UNPROVEN = 256
# A handshake broken off is reported only if the job is still running this long after:
# the job's own workers break theirs off as it ends (a root whose program fails at once
# closes its watchdog's connection mid-handshake), and the root's SHUTDOWN, on another
# connection, may reach the broker after the monitor's event.
BROKEN_OFF_GRACE_S = 2.0
# The most file descriptors asked for when raising the soft limit to an unlimited hard one.
MAX_OPEN_FILES = 1 << 20
# The brokers' in-process endpoints (inproc://) and their contexts: inproc:// reaches only
# sockets of the same context, so a link in the broker's own process (the launcher's
# in-process root) connects through the broker's, and its messages skip both I/O threads
# and the kernel (issue 12: each hop through them cost more than the Python on either end).
_INPROC: dict[str, zmq.Context] = {}


def share_inproc(address: str, ctx: zmq.Context | None) -> None:
    """Make ``address`` (inproc://, bound in ``ctx``) reachable by :func:`context_for`;
    None: no more."""
    if ctx is None:
        _INPROC.pop(address, None)
    else:
        _INPROC[address] = ctx


def context_for(address: str) -> zmq.Context | None:
    """The context a link to ``address`` must use (an in-process broker's), or None."""
    if not address.startswith("inproc://"):
        return None
    try:
        return _INPROC[address]
    except KeyError:
        raise ValueError(f"no broker of this process listens at {address}") from None


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the new one.

    A broker holds one descriptor per connection, its own and hostile ones; the common
    soft default of 1024 is easy to exhaust from the network while the hard one is not.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # e.g. over the kernel's nr_open: keep what we have
            pass
    return soft


class Credentials:
    """A job's secrets: the message key and, when the job is encrypted, its CURVE keys.

    ``curve`` maps ``server_public``, ``public`` and ``secret`` (the workers' key pair),
    and in the launcher also ``server_secret``, to Z85 text.
    """

    def __init__(self, key: bytes, curve: dict | None = None) -> None:
        if len(key) < 16:
            raise ValueError("the job key must be at least 16 bytes")
        self.key = key
        self.curve = curve
        # What a PLAIN client presents: derived, so the key itself never crosses the wire.
        self.token = hmac.new(key, b"scoop handshake token", hashlib.sha256).hexdigest().encode()

    @classmethod
    def new(cls, encrypt: bool = False) -> Credentials:
        """Fresh random credentials for one job (CURVE key pairs too with ``encrypt``)."""
        curve = None
        if encrypt:
            if not zmq.has("curve"):
                raise RuntimeError("this pyzmq/libzmq has no CURVE support; install a pyzmq "
                                   "wheel (it bundles libsodium) or leave encryption off")
            server_public, server_secret = zmq.curve_keypair()
            public, secret = zmq.curve_keypair()
            curve = {"server_public": server_public.decode(),
                     "server_secret": server_secret.decode(),
                     "public": public.decode(), "secret": secret.decode()}
        return cls(os.urandom(32), curve)

    @property
    def encrypted(self) -> bool:
        return self.curve is not None

    def for_worker(self) -> dict:
        """The entries of a worker's config that carry these credentials."""
        cfg: dict = {"key": self.key.hex()}
        if self.curve:
            cfg["curve"] = {k: v for k, v in self.curve.items() if k != "server_secret"}
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> Credentials:
        """The credentials in a worker's config (see :meth:`for_worker`)."""
        return cls(bytes.fromhex(cfg["key"]), cfg.get("curve"))

    def connect(self, ctx: zmq.Context, identity: bytes, address: str,
                linger_ms: int = 0) -> zmq.Socket:
        """A DEALER connected to the broker at ``address``, presenting these credentials."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        if self.curve:
            sock.curve_serverkey = self.curve["server_public"].encode()
            sock.curve_publickey = self.curve["public"].encode()
            sock.curve_secretkey = self.curve["secret"].encode()
        else:
            sock.plain_username = PLAIN_USER
            sock.plain_password = self.token
        sock.connect(address)
        return sock

    def listen(self, ctx: zmq.Context, host: str, port: int = 0) -> tuple[zmq.Socket, str]:
        """The broker's ROUTER bound to ``host:port`` (0: any free port), and its address.

        Start a :class:`Gate` on ``ctx`` first: it decides who gets through the handshake.
        """
        if self.curve and "server_secret" not in self.curve:
            raise ValueError("only the launcher's credentials can serve an encrypted job")
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # With ROUTER_MANDATORY a send to a peer whose queue is full blocks; the broker
        # must never block (a root that ships thousands of groups without reading its
        # results, while the broker waits to send it results, deadlocked a job of 1,000
        # simulated workers: bench/simulate.py). A peer's unread messages queue here,
        # in memory, until it reads them: only job members get any (each message answers
        # one of theirs), and a peer that goes away takes its queue with it.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
        sock.zap_domain = ZAP_DOMAIN
        if self.curve:
            sock.curve_server = True
            sock.curve_secretkey = self.curve["server_secret"].encode()
        else:
            sock.plain_server = True
        if port:
            sock.bind(f"tcp://{host}:{port}")
        else:
            port = sock.bind_to_random_port(f"tcp://{host}")
        return sock, f"tcp://{host}:{port}"


def _monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """The event number and value of a ZeroMQ monitor message (a uint16, then a uint32).

    Parsed here rather than with ``zmq.utils.monitor``, which imports asyncio: tens of
    milliseconds at every worker's start.
    """
    return struct.unpack_from("=HI", frames[0])


class Gate:
    """Answers ZeroMQ's handshake checks (ZAP) for the broker; logs each refusal once;
    keeps the number of connections not yet proven to be the job's bounded.

    Lives in the broker's thread: register :attr:`sockets` with its poller and pass the
    ready ones to :meth:`handle`; call :meth:`proven` with the descriptor of each
    connection a signed first message (HELLO, JOIN, PING) came from.

    *The bound.* ZeroMQ drops a connection that does not finish its handshake within
    :data:`HANDSHAKE_TIMEOUT_MS`, but does not limit how many may be pending meanwhile, and
    a peer holding the (PLAIN) token passes the handshake and may then stay silent. The
    monitor reports each accepted connection with its descriptor and each disconnection;
    a message carries the descriptor it came in on. A connection is unproven from its
    acceptance until its first signed message; above ``max_unproven`` the oldest unproven
    one is shut down (``shutdown(2)`` on ZeroMQ's descriptor, which ZeroMQ then sees as a
    peer that left; the descriptor itself stays ZeroMQ's to close). A worker hung up this
    way reconnects by itself.
    """

    def __init__(self, ctx: zmq.Context, creds: Credentials,
                 max_unproven: int = MAX_UNPROVEN) -> None:
        self.creds = creds
        self.ctx = ctx
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)  # before the broker binds: no connection goes unchecked
        self.monitor: zmq.Socket | None = None
        self.sockets = [self.zap]
        self.refused = 0
        self.hung_up = 0  # unproven connections shut down to keep within the bound
        self.max_unproven = max_unproven
        # Unproven connections, oldest first: descriptor -> the peer's (address, port), to
        # hang up only the connection seen (a descriptor is reused once ZeroMQ closes it).
        self._unproven: dict[int, tuple] = {}
        # Connections proven before the monitor's ACCEPTED for them was read (the router
        # is read first): descriptor -> peer, so that the late event does not count them.
        self._proven: dict[int, tuple | None] = {}
        self._logged: set = set()
        # Set by the broker once the job stops: its workers are ended then, some of them
        # in the middle of their handshake, which is not worth a warning.
        self.stopping = False
        # When each pending one was seen (monotonic): a flood of them is taken from the
        # front, so a deque.
        self._broken_off: collections.deque[float] = collections.deque()

    def watch(self, router: zmq.Socket) -> None:
        """Follow ``router``'s connections: count those that fail before the credentials
        check (garbage, a client without credentials), and track the unproven ones."""
        address = f"inproc://scoop-gate-{id(self)}"
        router.monitor(address, _HANDSHAKE_FAILED | zmq.EVENT_ACCEPTED
                       | zmq.EVENT_DISCONNECTED)
        self.monitor = self.ctx.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.LINGER, 0)
        # No high-water mark: a dropped ACCEPTED or DISCONNECTED event would leave the
        # bookkeeping of descriptors stale (events are a few dozen bytes each).
        self.monitor.setsockopt(zmq.RCVHWM, 0)
        self.monitor.connect(address)
        self.sockets.append(self.monitor)

    def handle(self, sock: zmq.Socket) -> bool:
        """Answer the ZAP requests, or take the monitor's events, that are waiting (a
        bounded number); never raises: nothing a peer sends may end the broker's loop (a
        ZAP request left unanswered only keeps that one connection waiting until the
        handshake timeout drops it). Whether more may be waiting (the bound was reached:
        call again without sleeping)."""
        more = True
        for _ in range(MAX_EVENTS_PER_CALL):
            try:
                self._handle(sock)
            except zmq.Again:
                more = False
                break
            except Exception as exc:  # noqa: BLE001 - e.g. out of file descriptors or memory
                log.warning("broker: could not check a connection: %s: %s",
                            type(exc).__name__, exc)
                break
        while len(self._unproven) > self.max_unproven:
            fd = next(iter(self._unproven))
            self._hang_up(fd, self._unproven.pop(fd))
        return more

    def proven(self, fd: int | None) -> None:
        """The connection on descriptor ``fd`` sent a signed message: it is the job's
        (None: one in process, never counted)."""
        if (fd is not None and self._unproven.pop(fd, None) is None
                and fd not in self._proven):
            self._proven[fd] = _peer_of(fd)  # its ACCEPTED may still be on its way

    def _handle(self, sock: zmq.Socket) -> None:
        if sock is self.zap:
            self._answer(self.zap.recv_multipart(zmq.NOBLOCK))
            return
        event, value = _monitor_event(sock.recv_multipart(zmq.NOBLOCK))
        if event == zmq.EVENT_ACCEPTED:
            self._unproven.pop(value, None)
            peer = _peer_of(value)
            if self._proven.pop(value, None) != peer or peer is None:
                self._unproven[value] = peer
        elif event == zmq.EVENT_DISCONNECTED:
            self._unproven.pop(value, None)
            self._proven.pop(value, None)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._broken_off.append(time.monotonic())  # reported by settle(), or not
        else:
            self._refuse("a connection", "it failed the ZeroMQ handshake (not ZeroMQ, or "
                         "without this job's credentials)")

    def settle(self, now: float) -> None:
        """Report the handshakes broken off :data:`BROKEN_OFF_GRACE_S` ago while the job
        still runs; once it stops, they were its own workers': only counted."""
        pending = self._broken_off
        if self.stopping:
            self.refused += len(pending)
            pending.clear()
        while pending and pending[0] <= now - BROKEN_OFF_GRACE_S:
            pending.popleft()
            self._refuse("a connection", "it broke off during the ZeroMQ handshake")

    def _hang_up(self, fd: int, peer: tuple | None) -> None:
        if peer is None or _peer_of(fd) != peer:
            return  # already gone: the descriptor is free or another connection's now
        try:
            conn = socket.socket(fileno=fd)  # wraps ZeroMQ's descriptor, allocates none
        except OSError:
            return
        try:
            conn.shutdown(socket.SHUT_RDWR)
            self.hung_up += 1
        except OSError:
            pass
        finally:
            conn.detach()  # the descriptor stays ZeroMQ's to close
        if self.hung_up == 1:
            log.warning("broker: more than %d connections were not (yet) proven to be of "
                        "this job; hanging up the oldest of them (further ones are only "
                        "counted)", self.max_unproven)

    def _answer(self, request: list[bytes]) -> None:
        # A REP socket must answer before it can read the next request: whatever the
        # request holds, exactly one reply goes out.
        version, request_id = (request + [b"1.0", b""])[:2]
        try:
            ok, who, mechanism = self._check(request)
        except Exception:  # noqa: BLE001 - a malformed request is refused
            ok, who, mechanism = False, "a connection", "malformed"
        if ok:
            self.zap.send_multipart([version, request_id, b"200", b"OK", b"worker", b""])
            return
        self.zap.send_multipart([version, request_id, b"400", b"not a worker of this job",
                                 b"", b""])
        self._refuse(who, f"wrong {mechanism} credentials")

    def _check(self, request: list[bytes]) -> tuple[bool, str, str]:
        """(accepted?, the peer's address, the mechanism) for a ZAP request."""
        _version, _request_id, _domain, address, _identity, mechanism, *creds = request
        ok = False
        if mechanism == b"PLAIN" and not self.creds.curve and len(creds) == 2:
            ok = creds[0] == PLAIN_USER and hmac.compare_digest(creds[1], self.creds.token)
        elif mechanism == b"CURVE" and self.creds.curve and len(creds) == 1:
            ok = hmac.compare_digest(
                zmq.utils.z85.encode(creds[0]), self.creds.curve["public"].encode())
        return ok, address.decode(errors="replace"), mechanism.decode(errors="replace")

    def _refuse(self, who: str, why: str) -> None:
        self.refused += 1
        # One line per peer address, and only for the first few: a flood from many
        # addresses must fill neither the log nor this set.
        if who not in self._logged and len(self._logged) < MAX_LOGGED_PEERS:
            self._logged.add(who)
            more = ("" if len(self._logged) < MAX_LOGGED_PEERS else
                    "; refusals from other addresses are only counted from now on")
            log.warning("broker: refused %s: %s (further refusals are counted%s)",
                        who, why, more)

    def close(self) -> None:
        self.refused += len(self._broken_off)  # the job ended meanwhile: its own workers'
        self._broken_off.clear()
        if self.monitor is not None:
            self.monitor.close(0)
        self.zap.close(0)
        if self.refused:
            log.info("broker: refused %d connection(s) that were not of this job",
                     self.refused)
        if self.hung_up:
            log.info("broker: hung up %d connection(s) that were not proven in time",
                     self.hung_up)


def _peer_of(fd: int) -> tuple | None:
    """The remote (address, port) of the TCP connection on ``fd``, None if there is none."""
    try:
        conn = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return conn.getpeername() if conn.type == socket.SOCK_STREAM else None
    except OSError:
        return None
    finally:
        conn.detach()
