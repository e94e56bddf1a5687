#!/usr/bin/python3
"""kbclient: a small Python gRPC client of kbridged, for the scenario tests.

Run it with Debian's /usr/bin/python3 (python3-grpcio, python3-protobuf) and
PYTHONPATH pointing at the generated stubs (gen/python in the build tree).

    kbclient.py --address unix:/path/kb.sock COMMAND [OPTIONS]

Commands (see `kbclient.py COMMAND --help`):
  publish    Publish generated records over one client stream (or, with
             --per-call, over many short calls); prints a JSON result.
  subscribe  Subscribe; prints one JSON line per record on stdout, "READY" on
             stderr once the initial metadata arrived, and the JSON result as
             "RESULT {...}" on stderr (and in --result FILE): besides the
             common fields, "initial" (initial metadata), "skipped" (the
             kbridge-skipped ranges), "positions" (the kbridge-positions
             trailer as a list of "T:P:O", null when absent) and
             "next_positions" ("T:P:O" = last printed offset + 1 for each
             partition a record came from).
  fanout     Many concurrent subscribers (grpc.aio, one process); prints
             "READY N" on stderr once all have their initial metadata.
  stream     Publish generated records over one PublishStream call; prints a
             JSON result with every ack and every record's result.
  produce    Publish generated records in one Produce call; prints the results.
  topics     Call ListTopics; prints the topics and their partition counts.
  flood      Many concurrent Publish calls of big requests (memory bounds).
  storm      Many threads that open Publish/PublishStream calls and cancel them
             or drop their connections mid-stream; logs what was acknowledged.
  rpc        Call Produce, PublishStream or ListTopics once; prints a JSON result.
  raw        Send raw bytes to any method path (no protobuf encoding), to test
             undecodable requests and unknown methods; prints a JSON result.

Records are numbered: record i has value "v<i>-" padded with "x" to --size
bytes, key "<key-prefix><i>" when --key-prefix is given, the --header
headers and, with --index-header NAME, a header NAME=<i>. --empty-topic,
--big-record and --bad-partition (repeatable) spoil single records, counted
from 0 in the run.

The JSON result has "code" (gRPC status code number), "code_name", "details",
"durable" (the kbridge-durable-requests trailer as an int, or null) and
command-specific fields. The exit status is 0 when the call ended with the
status given by --expect (default OK), 1 otherwise, 2 for bad usage.
"""

import argparse
import json
import os
import sys
import threading
import time

import grpc

from kbridge.v1 import bridge_pb2, bridge_pb2_grpc

DURABLE_TRAILER = "kbridge-durable-requests"
CODES = {c.name: c for c in grpc.StatusCode}


def code_arg(name):
    """argparse type: a status code name such as INVALID_ARGUMENT."""
    try:
        return CODES[name.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown status code {name!r}; one of {', '.join(CODES)}")


def status_code_number(code):
    return code.value[0]


def durable_from(metadata):
    for key, value in metadata or ():
        if key == DURABLE_TRAILER:
            try:
                return int(value)
            except ValueError:
                return value
    return None


def result_of(code, details="", trailers=None):
    return {
        "code": status_code_number(code),
        "code_name": code.name,
        "details": details or "",
        "durable": durable_from(trailers),
        "trailers": {k: v if isinstance(v, str) else v.hex() for k, v in (trailers or ())},
    }


def finish(args, result, out=sys.stdout):
    """Prints the result; returns the exit status for --expect."""
    print(json.dumps(result), file=out, flush=True)
    if result["code_name"] != args.expect.name:
        print(f"kbclient: {args.command}: expected {args.expect.name}, got "
              f"{result['code_name']}: {result['details']}", file=sys.stderr, flush=True)
        return 1
    return 0


def channel_for(args):
    return grpc.insecure_channel(args.address, options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 256 << 20),
    ])


# --- publish ---

def parse_header(s):
    k, sep, v = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"header {s!r}: want KEY=VALUE")
    return (k, v.encode())


def parse_big(s):
    idx, sep, size = s.partition(":")
    try:
        return int(idx), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: want INDEX:SIZE")


class RecordMaker:
    """Builds record number i (see the module documentation)."""

    def __init__(self, args):
        self.args = args

    def value(self, i, size):
        head = f"v{i}-".encode()
        return head + b"x" * max(0, size - len(head))

    def make(self, i, local):
        a = self.args
        size = a.size
        for idx, big in a.big_record:
            if local == idx:
                size = big
        rec = bridge_pb2.Record(topic=a.topic, value=self.value(i, size))
        if local in a.empty_topic:
            rec.topic = ""
        if a.key_prefix is not None:
            rec.key = f"{a.key_prefix}{i}".encode()
        for k, v in a.header:
            rec.headers.add(key=k, value=v)
        if a.index_header:
            rec.headers.add(key=a.index_header, value=str(i).encode())
        if a.partition is not None:
            rec.partition = a.partition
        if getattr(a, "timestamp", None):
            rec.timestamp_ms = a.timestamp
        for idx, part in getattr(a, "bad_partition", ()):
            if local == idx:
                rec.partition = part
        return rec


class RequestStream:
    """The request iterator of one Publish call: records [first, first+count).

    Counts what gRPC has taken from it (handed over), and can stop after a
    number of requests (to cancel) or hold the stream open (to be killed)."""

    def __init__(self, args, maker, first, count):
        self.args, self.maker = args, maker
        self.first, self.count = first, count
        self.sent_requests = 0
        self.sent_records = 0
        self.reached = threading.Event()   # --cancel-after requests taken
        self.release = threading.Event()   # lets a held generator end

    def __iter__(self):
        a = self.args
        local = self.first - a.start
        end = self.first + self.count
        i = self.first
        while i < end:
            if a.cancel_after is not None and self.sent_requests == a.cancel_after:
                self.reached.set()
                self.release.wait()
                return
            n = min(a.per_request, end - i)
            req = bridge_pb2.PublishRequest(
                records=[self.maker.make(i + j, local + j) for j in range(n)])
            self.sent_requests += 1
            self.sent_records += n
            yield req
            i += n
            local += n
            if a.delay:
                time.sleep(a.delay)
        if a.hang:
            print(f"SENT requests={self.sent_requests} records={self.sent_records}",
                  file=sys.stderr, flush=True)
            self.release.wait()
        self.reached.set()


def publish_call(args, stub, maker, first, count):
    """One Publish call; returns (result dict, response or None)."""
    stream = RequestStream(args, maker, first, count)
    fut = stub.Publish.future(iter(stream), timeout=args.timeout)
    cancelled_by_us = False
    if args.cancel_after is not None:
        while not stream.reached.wait(0.05):
            if fut.done():
                break
        if not fut.done():
            time.sleep(args.cancel_delay)
            fut.cancel()
            cancelled_by_us = True
        stream.release.set()
    try:
        resp = fut.result()
        res = result_of(grpc.StatusCode.OK, "", fut.trailing_metadata())
        res["records"] = resp.records
        res["spooled"] = resp.spooled
        res["ranges"] = [{"topic": r.topic, "partition": r.partition,
                          "first_offset": r.first_offset, "last_offset": r.last_offset,
                          "count": r.count} for r in resp.ranges]
    except grpc.FutureCancelledError:
        res = result_of(grpc.StatusCode.CANCELLED, "cancelled by the client")
        resp = None
    except grpc.RpcError as e:
        res = result_of(e.code(), e.details(), e.trailing_metadata())
        resp = None
    finally:
        stream.release.set()
    res["sent_requests"] = stream.sent_requests
    res["sent_records"] = stream.sent_records
    res["cancelled_by_client"] = cancelled_by_us
    return res, resp


def cmd_publish(args):
    stub = bridge_pb2_grpc.BridgeStub(channel_for(args))
    maker = RecordMaker(args)
    if not args.per_call:
        res, _ = publish_call(args, stub, maker, args.start, args.records)
        return finish(args, res)
    # Many short calls: stop at the first failure; log each acknowledged call.
    acked = 0
    calls = 0
    log = open(args.acked_log, "a") if args.acked_log else None
    res = None
    first = args.start
    end = args.start + args.records
    while first < end:
        n = min(args.per_call, end - first)
        res, resp = publish_call(args, stub, maker, first, n)
        calls += 1
        if res["code"] != 0:
            break
        if resp.records != n:
            res = result_of(grpc.StatusCode.INTERNAL,
                            f"call {calls}: response says {resp.records} records, sent {n}")
            break
        acked += n
        if log:
            log.write(f"{first} {first + n - 1}\n")
            log.flush()
        first += n
    if log:
        log.close()
    res = res or result_of(grpc.StatusCode.OK)
    res["calls"] = calls
    res["acked_records"] = acked
    return finish(args, res)


# --- stream, produce, topics ---

PUBLISH_STREAM = "/kbridge.v1.Bridge/PublishStream"
# Field 1 (records) says 5 bytes follow; one does: protobuf cannot decode it.
UNDECODABLE = b"\x0a\x05\x01"


def parse_partition(s):
    idx, sep, part = s.partition(":")
    try:
        return int(idx), int(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: want INDEX:PARTITION")


def record_spoilers(sp):
    sp.add_argument("--big-record", type=parse_big, action="append", default=[],
                    metavar="INDEX:SIZE",
                    help="record INDEX (from 0 in this run) gets a value of SIZE bytes (repeatable)")
    sp.add_argument("--empty-topic", type=int, action="append", default=[], metavar="INDEX",
                    help="record INDEX (from 0 in this run) gets an empty topic (repeatable)")
    sp.add_argument("--bad-partition", type=parse_partition, action="append", default=[],
                    metavar="INDEX:PARTITION",
                    help="record INDEX (from 0 in this run) gets explicit PARTITION (repeatable)")


def record_options(sp):
    sp.add_argument("--topic", required=True)
    sp.add_argument("--records", type=int, default=1, help="records to send (default 1)")
    sp.add_argument("--size", type=int, default=100, help="value bytes (default 100)")
    sp.add_argument("--start", type=int, default=0, help="number of the first record")
    sp.add_argument("--key-prefix", help="key each record with PREFIX<i>")
    sp.add_argument("--header", type=parse_header, action="append", default=[],
                    metavar="KEY=VALUE", help="a header on every record (repeatable)")
    sp.add_argument("--index-header", metavar="NAME", help="a header NAME=<i> on every record")
    sp.add_argument("--partition", type=int, help="explicit partition for every record")
    record_spoilers(sp)


def ack_results(ack, numbers):
    """[[record number, sequence, partition, offset, code, error], ...] of one ack."""
    out = []
    for j, r in enumerate(ack.results):
        i = numbers[j] if j < len(numbers) else None
        out.append([i, ack.sequence, r.partition, r.offset, r.code, r.error])
    return out


class AckLog:
    """Appends "NUMBER PARTITION OFFSET" for each record acknowledged with code 0,
    flushed at once: a client killed later has logged every ack it saw."""

    def __init__(self, path):
        self.f = open(path, "a") if path else None
        self.lock = threading.Lock()

    def write(self, rows):
        if not self.f:
            return
        with self.lock:
            for i, _, part, off, code, _ in rows:
                if code == 0:
                    self.f.write(f"{i} {part} {off}\n")
            self.f.flush()


def stream_call(args, chan, maker, acklog=None, on_call=None):
    """One PublishStream call of args.records records (args.per_request a request).

    With --garbage-after N, once N acks have arrived the next request is
    undecodable bytes and the stream is not half-closed. With --cancel-after N,
    the call is cancelled --cancel-delay seconds after gRPC took N requests."""
    call_fn = chan.stream_stream(PUBLISH_STREAM, request_serializer=None,
                                 response_deserializer=bridge_pb2.PublishAck.FromString)
    numbers = {}          # sequence -> record numbers of that request
    state = {"acks": 0, "sent": 0, "records_sent": 0}
    cond = threading.Condition()
    release = threading.Event()
    reached = threading.Event()

    def requests():
        i, end, seq = args.start, args.start + args.records, 0
        while i < end:
            if args.cancel_after is not None and seq == args.cancel_after:
                reached.set()
                release.wait()
                return
            if args.garbage_after is not None and seq == args.garbage_after:
                with cond:
                    cond.wait_for(lambda: state["acks"] >= seq or release.is_set(), args.timeout)
                state["garbage_sent"] = True
                yield UNDECODABLE
                release.wait()
                return
            n = min(args.per_request, end - i)
            numbers[seq] = list(range(i, i + n))
            req = bridge_pb2.PublishRequest(
                records=[maker.make(i + j, i + j - args.start) for j in range(n)])
            seq += 1
            state["sent"] = seq
            state["records_sent"] += n
            yield req.SerializeToString()
            i += n
            if args.delay:
                time.sleep(args.delay)
        if args.garbage_after is not None and seq == args.garbage_after:
            with cond:
                cond.wait_for(lambda: state["acks"] >= seq or release.is_set(), args.timeout)
            state["garbage_sent"] = True
            yield UNDECODABLE
            release.wait()
        reached.set()

    call = call_fn(requests(), timeout=args.timeout)
    if on_call:
        on_call(call)
    seqs, results = [], []
    cancelled_by_us = False

    def canceller():
        nonlocal cancelled_by_us
        while not reached.wait(0.05):
            if release.is_set():
                return
        if release.is_set():
            return
        time.sleep(args.cancel_delay)
        cancelled_by_us = True
        call.cancel()

    if args.cancel_after is not None:
        threading.Thread(target=canceller, daemon=True).start()
    try:
        for ack in call:
            rows = ack_results(ack, numbers.get(ack.sequence, []))
            seqs.append(ack.sequence)
            results.extend(rows)
            if acklog:
                acklog.write(rows)
            with cond:
                state["acks"] += 1
                cond.notify_all()
        res = result_of(grpc.StatusCode.OK, "", call.trailing_metadata())
    except grpc.RpcError as e:
        if cancelled_by_us or e.code() == grpc.StatusCode.CANCELLED:
            res = result_of(grpc.StatusCode.CANCELLED, e.details() or "cancelled")
        else:
            res = result_of(e.code(), e.details(), e.trailing_metadata())
    finally:
        release.set()
        with cond:
            cond.notify_all()
    res.update(seqs=seqs, results=results, sent_requests=state["sent"],
               sent_records=state["records_sent"], garbage_sent=state.get("garbage_sent", False),
               cancelled_by_client=cancelled_by_us)
    return res


def cmd_stream(args):
    chan = channel_for(args)
    res = stream_call(args, chan, RecordMaker(args), AckLog(args.ack_log))
    chan.close()
    return finish(args, res)


def cmd_produce(args):
    stub = bridge_pb2_grpc.BridgeStub(channel_for(args))
    maker = RecordMaker(args)
    req = bridge_pb2.PublishRequest(
        records=[maker.make(args.start + j, j) for j in range(args.records)])
    try:
        ack = stub.Produce(req, timeout=args.timeout)
        res = result_of(grpc.StatusCode.OK)
        res["sequence"] = ack.sequence
        res["results"] = ack_results(ack, list(range(args.start, args.start + args.records)))
    except grpc.RpcError as e:
        res = result_of(e.code(), e.details(), e.trailing_metadata())
    return finish(args, res)


def cmd_topics(args):
    stub = bridge_pb2_grpc.BridgeStub(channel_for(args))
    try:
        resp = stub.ListTopics(bridge_pb2.ListTopicsRequest(), timeout=args.timeout)
        res = result_of(grpc.StatusCode.OK)
        res["topics"] = [[t.name, t.partitions] for t in resp.topics]
    except grpc.RpcError as e:
        res = result_of(e.code(), e.details(), e.trailing_metadata())
    return finish(args, res)


# --- storm ---

class StormArgs:
    """The per-call settings stream_call and publish_call read from args."""

    def __init__(self, base, **kw):
        self.__dict__.update(vars(base))
        self.__dict__.update(kw)


def storm_client(args, tid, acklog, counts, lock):
    """One storm client: --rounds calls, each on its own channel (connection)."""
    import random
    rnd = random.Random(args.seed * 100003 + tid)
    for rnd_no in range(args.rounds):
        first = (tid * args.rounds + rnd_no) * 100000
        nreq = rnd.randint(1, args.max_requests)
        how = rnd.choice(["cancel", "cancel", "close", "complete"])
        kind = rnd.choice(["publish", "stream"])
        cut = rnd.randint(0, nreq) if how != "complete" else None
        a = StormArgs(args, start=first, records=nreq * args.per_request,
                      cancel_after=cut if how == "cancel" else None,
                      cancel_delay=rnd.random() * 0.2, garbage_after=None, hang=False,
                      delay=args.delay, big_record=[], empty_topic=[], bad_partition=[],
                      partition=None, index_header=None, header=[], size=50,
                      timeout=args.timeout)
        chan = channel_for(args)
        maker = RecordMaker(a)
        if how == "close":
            # Drops the connection under the running call after a while.
            threading.Timer(rnd.random() * 0.5, chan.close).start()
        try:
            if kind == "stream":
                res = stream_call(a, chan, maker, acklog)
            else:
                res, resp = publish_call(a, bridge_pb2_grpc.BridgeStub(chan), maker,
                                         first, a.records)
                if res["code"] == 0:
                    acklog.write([[i, 0, -1, -1, 0, ""] for i in range(first, first + a.records)])
        except ValueError:
            # grpc raises this when the channel was closed before the call started.
            res = {"code_name": "CLOSED"}
        finally:
            chan.close()
        with lock:
            key = f"{kind}/{how}/{res['code_name']}"
            counts[key] = counts.get(key, 0) + 1


def cmd_storm(args):
    acklog = AckLog(args.ack_log)
    counts, lock = {}, threading.Lock()
    threads = [threading.Thread(target=storm_client, args=(args, args.first_client + t,
                                                           acklog, counts, lock), daemon=True)
               for t in range(args.clients)]
    print("STARTED", file=sys.stderr, flush=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = result_of(grpc.StatusCode.OK)
    res["calls"] = counts
    return finish(args, res)


# --- flood ---

def flood_stream(args, stub, sid, out):
    """One Publish call of about --bytes bytes in requests of --request-bytes."""
    per = args.records_per_request
    size = max(1, args.request_bytes // per - 32)
    value = b"m" * size
    nreq = max(1, args.bytes // args.request_bytes)

    def requests():
        for r in range(nreq):
            yield bridge_pb2.PublishRequest(records=[
                bridge_pb2.Record(topic=args.topic, key=f"m{sid}-{r * per + j}".encode(),
                                  value=value) for j in range(per)])

    try:
        resp = stub.Publish(requests(), timeout=args.timeout)
        res = result_of(grpc.StatusCode.OK)
        res["records"] = resp.records
    except grpc.RpcError as e:
        res = result_of(e.code(), e.details(), e.trailing_metadata())
        res["records"] = 0
    res["sent"] = nreq * per
    out[sid] = res


def cmd_flood(args):
    chans = [channel_for(args) for _ in range(args.channels)]
    stubs = [bridge_pb2_grpc.BridgeStub(c) for c in chans]
    out = {}
    threads = [threading.Thread(target=flood_stream, args=(args, stubs[s % len(stubs)], s, out),
                                daemon=True) for s in range(args.streams)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = {s: r for s, r in out.items() if r["code"] != 0 or r["records"] != r["sent"]}
    if failed:
        s, r = next(iter(failed.items()))
        res = result_of(CODES[r["code_name"]] if r["code"] else grpc.StatusCode.INTERNAL,
                        f"{len(failed)} of {args.streams} streams failed; stream {s}: "
                        f"{r['code_name']} {r['details']} ({r['records']} of {r['sent']} records)")
    else:
        res = result_of(grpc.StatusCode.OK)
    res["streams"] = args.streams
    res["records"] = sum(r["records"] for r in out.values())
    res["seconds"] = round(time.monotonic() - begin, 3)
    return finish(args, res)


# --- subscribe ---

POSITIONS_MD = "kbridge-positions"
SKIPPED_MD = "kbridge-skipped"


def record_json(rec, batch):
    return {
        "topic": rec.topic,
        "partition": rec.partition if rec.HasField("partition") else None,
        "offset": rec.offset,
        "timestamp_ms": rec.timestamp_ms,
        "key": rec.key.decode("utf-8", "backslashreplace"),
        "value": rec.value.decode("utf-8", "backslashreplace"),
        "headers": [[h.key, h.value.decode("utf-8", "backslashreplace")] for h in rec.headers],
        "batch": batch,
    }


def parse_start(s):
    """argparse type: latest, earliest or timestamp:MS."""
    if s in ("latest", "earliest"):
        return (s, 0)
    kind, sep, ms = s.partition(":")
    if kind == "timestamp" and sep:
        try:
            return ("timestamp", int(ms))
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{s!r}: want latest, earliest or timestamp:MS")


def parse_position(s):
    """argparse type: TOPIC:PARTITION:OFFSET (the topic may contain no colon)."""
    parts = s.rsplit(":", 2)
    try:
        if len(parts) == 3 and parts[0]:
            return (parts[0], int(parts[1]), int(parts[2]))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{s!r}: want TOPIC:PARTITION:OFFSET")


def metadata_dict(md):
    return {k: v if isinstance(v, str) else v.hex() for k, v in (md or ())}


def parse_positions_text(text):
    """kbridge-positions / kbridge-skipped text "T:P:X,..." as a list of strings
    (empty list for no text)."""
    return [p for p in (text or "").split(",") if p]


def subscribe_request(args):
    kind, ms = args.start
    start = {"latest": bridge_pb2.SubscribeRequest.LATEST,
             "earliest": bridge_pb2.SubscribeRequest.EARLIEST,
             "timestamp": bridge_pb2.SubscribeRequest.TIMESTAMP}[kind]
    req = bridge_pb2.SubscribeRequest(topics=args.topic, start=start,
                                      start_timestamp_ms=ms, max_batch=args.max_batch)
    if args.group:
        req.group = args.group
    for t, p, o in args.position:
        req.positions.add(topic=t, partition=p, offset=o)
    return req


def wait_for_file(path, done):
    """Stall: returns once PATH exists (or the call ended)."""
    while not os.path.exists(path) and not done.is_set():
        time.sleep(0.05)


def cmd_subscribe(args):
    opts = []
    if args.stall_after is not None or args.read_delay:
        # A stalled or slow reader must push back on the daemon soon: no window growth
        # (BDP probing) and a small stream window, or gRPC would go on reading
        # megabytes into its own buffers on our behalf.
        opts = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    chan = grpc.insecure_channel(args.address, options=[
        ("grpc.max_receive_message_length", 64 << 20)] + opts)
    stub = bridge_pb2_grpc.BridgeStub(chan)
    call = stub.Subscribe(subscribe_request(args))
    state = {"last": time.monotonic(), "why": None, "stalled": False}
    done = threading.Event()

    def watchdog():
        begin = time.monotonic()
        while not done.wait(0.05):
            now = time.monotonic()
            if args.timeout and now - begin > args.timeout:
                state["why"] = "timeout"
            elif args.idle and not state["stalled"] and now - state["last"] > args.idle:
                state["why"] = "idle"
            else:
                continue
            call.cancel()
            return

    threading.Thread(target=watchdog, daemon=True).start()
    records = responses = max_response = 0
    nextpos = {}          # "topic:partition" -> last printed offset + 1
    initial = {}
    code, details, trailers = grpc.StatusCode.OK, "", None
    limit = args.cancel_after if args.cancel_after is not None else args.count

    def stall_if_due():
        if args.stall_after is None or state["stalled"] is None or records < args.stall_after:
            return
        state["stalled"] = True
        print(f"STALLED {records}", file=sys.stderr, flush=True)
        wait_for_file(args.resume_file, done)
        print("RESUMED", file=sys.stderr, flush=True)
        state["stalled"] = None   # once only
        state["last"] = time.monotonic()

    try:
        initial = metadata_dict(call.initial_metadata())
        # --idle counts from here: the start offsets are fixed now.
        state["last"] = time.monotonic()
        if call.is_active() or call.code() is None:
            print("READY", file=sys.stderr, flush=True)
        stall_if_due()
        for resp in call:
            state["last"] = time.monotonic()
            responses += 1
            max_response = max(max_response, len(resp.records))
            for rec in resp.records:
                if args.cancel_after is not None and records >= limit:
                    break   # the rest of this response is not ours: positions say so
                print(json.dumps(record_json(rec, responses - 1)))
                nextpos[f"{rec.topic}:{rec.partition}"] = rec.offset + 1
                records += 1
            sys.stdout.flush()
            if limit and records >= limit:
                state["why"] = "count"
                call.cancel()
                break
            stall_if_due()
            if args.read_delay:
                time.sleep(args.read_delay)
    except grpc.RpcError as e:
        code, details, trailers = e.code(), e.details(), e.trailing_metadata()
    done.set()
    if state["why"] in ("count", "idle"):
        code, details, trailers = grpc.StatusCode.OK, f"stopped by the client ({state['why']})", None
    elif state["why"] == "timeout":
        code, details = grpc.StatusCode.DEADLINE_EXCEEDED, \
            f"client timeout after {args.timeout}s with {records} records"
    res = result_of(code, details, trailers)
    tmd = metadata_dict(trailers)
    res.update(records=records, responses=responses, max_response=max_response,
               initial=initial,
               skipped=parse_positions_text(initial.get(SKIPPED_MD) or tmd.get(SKIPPED_MD)),
               positions=parse_positions_text(tmd.get(POSITIONS_MD)) if POSITIONS_MD in tmd else None,
               next_positions=sorted(f"{k}:{v}" for k, v in nextpos.items()))
    if args.result:
        with open(args.result, "w") as f:
            json.dump(res, f)
    chan.close()
    print("RESULT", end=" ", file=sys.stderr)
    return finish(args, res, out=sys.stderr)


# --- fanout ---

def fanout_check(recs, prefix, first, last):
    """What is wrong with one subscriber's records (None if each of
    PREFIX<first..last> came exactly once, offsets rising by one per partition)."""
    seen, prev = set(), {}
    for r in recs:
        key = r.key.decode()
        if not key.startswith(prefix):
            return f"unexpected record {key!r}"
        i = int(key[len(prefix):])
        if i in seen:
            return f"record {i} twice"
        seen.add(i)
        p = (r.topic, r.partition)
        if p in prev and r.offset != prev[p] + 1:
            return f"{r.topic}/{r.partition}: offset {r.offset} after {prev[p]}"
        prev[p] = r.offset
    want = last - first + 1
    if len(seen) != want or min(seen, default=first) != first or max(seen, default=last) != last:
        return f"{len(seen)} of {want} records"
    return None


async def fanout_main(args):
    import asyncio
    chans = [grpc.aio.insecure_channel(args.address) for _ in range(args.channels)]
    stubs = [bridge_pb2_grpc.BridgeStub(c) for c in chans]
    want = args.last - args.first + 1
    ready = 0
    all_ready = asyncio.Event()
    results = {}

    async def one(i):
        nonlocal ready
        call = stubs[i % len(stubs)].Subscribe(
            bridge_pb2.SubscribeRequest(topics=args.topic), timeout=args.timeout)
        recs = []
        try:
            await call.initial_metadata()
            ready += 1
            if ready == args.subscribers:
                all_ready.set()
            async for resp in call:
                recs.extend(resp.records)
                if len(recs) >= want:
                    break
            call.cancel()
            results[i] = fanout_check(recs, args.key_prefix, args.first, args.last)
        except grpc.aio.AioRpcError as e:
            results[i] = f"{e.code().name}: {e.details()} after {len(recs)} records"
            all_ready.set()
        except asyncio.CancelledError:
            results[i] = f"cancelled after {len(recs)} records"

    tasks = [asyncio.ensure_future(one(i)) for i in range(args.subscribers)]
    await all_ready.wait()
    print(f"READY {ready}", file=sys.stderr, flush=True)
    await asyncio.gather(*tasks)
    for c in chans:
        await c.close()
    bad = {i: r for i, r in results.items() if r}
    if bad:
        i, r = sorted(bad.items())[0]
        res = result_of(grpc.StatusCode.INTERNAL,
                        f"{len(bad)} of {args.subscribers} subscribers failed; subscriber {i}: {r}")
    else:
        res = result_of(grpc.StatusCode.OK)
    res.update(subscribers=args.subscribers, ready=ready,
               complete=sum(1 for r in results.values() if r is None))
    return res


def cmd_fanout(args):
    import asyncio
    # Not asyncio.run: closing its loop joins grpc.aio's executor thread, which
    # can hang for ever once the calls are done. Print, then leave at once.
    loop = asyncio.new_event_loop()
    res = loop.run_until_complete(fanout_main(args))
    rc = finish(args, res)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# --- rpc and raw ---

def cmd_rpc(args):
    stub = bridge_pb2_grpc.BridgeStub(channel_for(args))
    rec = bridge_pb2.Record(topic=args.topic, value=b"rpc")
    req = bridge_pb2.PublishRequest(records=[rec])
    try:
        if args.method == "produce":
            stub.Produce(req, timeout=args.timeout)
        elif args.method == "list-topics":
            stub.ListTopics(bridge_pb2.ListTopicsRequest(), timeout=args.timeout)
        else:
            for _ in stub.PublishStream(iter([req]), timeout=args.timeout):
                pass
        res = result_of(grpc.StatusCode.OK)
    except grpc.RpcError as e:
        res = result_of(e.code(), e.details(), e.trailing_metadata())
    return finish(args, res)


def cmd_raw(args):
    chan = channel_for(args)
    msgs = [bytes.fromhex(h) for h in args.hex]
    kind = args.kind
    begin = time.monotonic()
    replies = 0
    try:
        if kind == "unary":
            chan.unary_unary(args.method)(msgs[0] if msgs else b"", timeout=args.timeout)
            replies = 1
        elif kind == "client-stream":
            chan.stream_unary(args.method)(iter(msgs), timeout=args.timeout)
            replies = 1
        elif kind == "server-stream":
            for _ in chan.unary_stream(args.method)(msgs[0] if msgs else b"",
                                                     timeout=args.timeout):
                replies += 1
        else:
            for _ in chan.stream_stream(args.method)(iter(msgs), timeout=args.timeout):
                replies += 1
        res = result_of(grpc.StatusCode.OK)
    except grpc.RpcError as e:
        res = result_of(e.code(), e.details(), e.trailing_metadata())
    res["replies"] = replies
    res["seconds"] = round(time.monotonic() - begin, 3)
    return finish(args, res)


def main():
    # `kill -USR1` prints every thread's stack: a hung client tells where it hangs.
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="unix:/path or host:port")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, timeout):
        sp.add_argument("--expect", type=code_arg, default=grpc.StatusCode.OK,
                        metavar="CODE", help="status code that means success (default OK)")
        sp.add_argument("--timeout", type=float, default=timeout,
                        help=f"deadline in seconds (default {timeout})")

    sp = sub.add_parser("publish", help="publish generated records")
    common(sp, 120)
    sp.add_argument("--topic", required=True)
    sp.add_argument("--records", type=int, default=1, help="records to send (default 1)")
    sp.add_argument("--size", type=int, default=100, help="value bytes (default 100)")
    sp.add_argument("--per-request", type=int, default=1, help="records per PublishRequest")
    sp.add_argument("--start", type=int, default=0, help="number of the first record")
    sp.add_argument("--key-prefix", help="key each record with PREFIX<i>")
    sp.add_argument("--header", type=parse_header, action="append", default=[],
                    metavar="KEY=VALUE", help="a header on every record (repeatable)")
    sp.add_argument("--index-header", metavar="NAME", help="a header NAME=<i> on every record")
    sp.add_argument("--partition", type=int, help="explicit partition for every record")
    sp.add_argument("--timestamp", type=int, metavar="MS",
                    help="Kafka timestamp of every record, ms since the epoch (default: now)")
    record_spoilers(sp)
    sp.add_argument("--delay", type=float, default=0, help="seconds to sleep between requests")
    sp.add_argument("--cancel-after", type=int, metavar="N",
                    help="cancel the call once gRPC has taken N requests")
    sp.add_argument("--cancel-delay", type=float, default=0.2,
                    help="seconds between the Nth request and the cancel (default 0.2)")
    sp.add_argument("--hang", action="store_true",
                    help="after the last request, print SENT on stderr and never half-close")
    sp.add_argument("--per-call", type=int, metavar="N",
                    help="many Publish calls of N records each, stopping at the first error")
    sp.add_argument("--acked-log", metavar="FILE",
                    help="with --per-call: append 'FIRST LAST' for each acknowledged call")
    sp.set_defaults(func=cmd_publish)

    sp = sub.add_parser("stream", help="publish generated records over one PublishStream call")
    common(sp, 120)
    record_options(sp)
    sp.add_argument("--per-request", type=int, default=1, help="records per PublishRequest")
    sp.add_argument("--delay", type=float, default=0, help="seconds to sleep between requests")
    sp.add_argument("--cancel-after", type=int, metavar="N",
                    help="cancel the call once gRPC has taken N requests")
    sp.add_argument("--cancel-delay", type=float, default=0.2,
                    help="seconds between the Nth request and the cancel (default 0.2)")
    sp.add_argument("--garbage-after", type=int, metavar="N",
                    help="once N acks arrived, send undecodable bytes as request N "
                         "and keep the stream open")
    sp.add_argument("--ack-log", metavar="FILE",
                    help="append 'NUMBER PARTITION OFFSET' for each record acknowledged OK")
    sp.set_defaults(func=cmd_stream)

    sp = sub.add_parser("produce", help="publish generated records in one Produce call")
    common(sp, 30)
    record_options(sp)
    sp.set_defaults(func=cmd_produce)

    sp = sub.add_parser("topics", help="list the topics (ListTopics)")
    common(sp, 30)
    sp.set_defaults(func=cmd_topics)

    sp = sub.add_parser("storm", help="threads that cancel calls or drop connections")
    common(sp, 60)
    sp.add_argument("--topic", required=True)
    sp.add_argument("--clients", type=int, default=50, help="threads (default 50)")
    sp.add_argument("--first-client", type=int, default=0,
                    help="number of the first thread: record numbers derive from it")
    sp.add_argument("--rounds", type=int, default=3, help="calls per thread (default 3)")
    sp.add_argument("--per-request", type=int, default=5, help="records per request")
    sp.add_argument("--max-requests", type=int, default=40, help="most requests per call")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--delay", type=float, default=0.02,
                    help="seconds between requests (default 0.02)")
    sp.add_argument("--key-prefix", default="s", help="key prefix (default s)")
    sp.add_argument("--ack-log", metavar="FILE", required=True,
                    help="append 'NUMBER PARTITION OFFSET' for each record acknowledged OK "
                         "(-1 -1 for Publish calls)")
    sp.set_defaults(func=cmd_storm)

    sp = sub.add_parser("flood", help="many concurrent Publish calls of big requests")
    common(sp, 600)
    sp.add_argument("--topic", required=True)
    sp.add_argument("--streams", type=int, default=100, help="concurrent calls (default 100)")
    sp.add_argument("--channels", type=int, default=10,
                    help="connections the calls are spread over (default 10)")
    sp.add_argument("--bytes", type=int, default=20000000, help="bytes per call (default 20 MB)")
    sp.add_argument("--request-bytes", type=int, default=65536,
                    help="bytes per request (default 64 KiB)")
    sp.add_argument("--records-per-request", type=int, default=4,
                    help="records per request (default 4); record s-i has key m<s>-<i>")
    sp.set_defaults(func=cmd_flood)

    sp = sub.add_parser("subscribe", help="subscribe and print records as JSON lines")
    common(sp, 60)
    sp.add_argument("--topic", action="append", default=[], help="topic (repeatable)")
    sp.add_argument("--start", type=parse_start, default=("latest", 0),
                    metavar="latest|earliest|timestamp:MS", help="start (default latest)")
    sp.add_argument("--position", type=parse_position, action="append", default=[],
                    metavar="TOPIC:PARTITION:OFFSET",
                    help="next offset to read there, overriding --start (repeatable)")
    sp.add_argument("--group", help="consumer group to join")
    sp.add_argument("--max-batch", type=int, default=0)
    sp.add_argument("--count", type=int, default=0,
                    help="cancel after this many records (prints the whole last response)")
    sp.add_argument("--cancel-after", type=int, metavar="N",
                    help="cancel after exactly N records: the rest of the last response is "
                         "dropped, and next_positions in the result is where to resume")
    sp.add_argument("--stall-after", type=int, metavar="N",
                    help="after N records (0: right after the initial metadata) stop reading, "
                         "print 'STALLED N' on stderr, and hold the stream open until "
                         "--resume-file exists; then print 'RESUMED' and read on")
    sp.add_argument("--resume-file", metavar="FILE", help="with --stall-after")
    sp.add_argument("--read-delay", type=float, default=0,
                    help="seconds to sleep after each response (a slow reader)")
    sp.add_argument("--idle", type=float, default=0,
                    help="cancel after this many seconds without records, counted from the "
                         "initial metadata (an OK end)")
    sp.add_argument("--result", metavar="FILE", help="also write the JSON result to FILE")
    sp.set_defaults(func=cmd_subscribe)

    sp = sub.add_parser("fanout", help="many concurrent LATEST subscribers in one process "
                        "(grpc.aio), each checking that it got every record")
    common(sp, 120)
    sp.add_argument("--topic", action="append", default=[], help="topic (repeatable)")
    sp.add_argument("--subscribers", type=int, default=1000)
    sp.add_argument("--channels", type=int, default=4,
                    help="connections the calls are spread over (default 4)")
    sp.add_argument("--key-prefix", required=True,
                    help="each subscriber must get the records PREFIX<first..last> exactly once")
    sp.add_argument("--first", type=int, default=0)
    sp.add_argument("--last", type=int, required=True)
    sp.set_defaults(func=cmd_fanout)

    sp = sub.add_parser("rpc", help="call another Bridge method once")
    common(sp, 10)
    sp.add_argument("method", choices=["produce", "publish-stream", "list-topics"])
    sp.add_argument("--topic", default="t")
    sp.set_defaults(func=cmd_rpc)

    sp = sub.add_parser("raw", help="send raw bytes to a method path")
    common(sp, 10)
    sp.add_argument("--method", required=True, help="e.g. /kbridge.v1.Bridge/Publish")
    sp.add_argument("--kind", default="unary",
                    choices=["unary", "client-stream", "server-stream", "bidi"])
    sp.add_argument("--hex", action="append", default=[], help="one message, in hex (repeatable)")
    sp.set_defaults(func=cmd_raw)

    args = p.parse_args()
    if args.command in ("publish", "stream", "storm") and args.per_request < 1:
        p.error("--per-request must be >= 1")
    if args.command == "subscribe" and (args.stall_after is None) != (args.resume_file is None):
        p.error("--stall-after and --resume-file go together")
    if getattr(args, "records", 0) < 0:
        p.error("--records must be >= 0")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
