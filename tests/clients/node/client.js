#!/usr/bin/env node
// kbridge test client in Node (grpc-js), used by tests/system/node-client.sh and
// for measuring publish rates by hand. It loads the .proto at run time, as most
// Node users of kbridge will, so it also checks that the contract file works with
// a second, independent protobuf implementation.
//
//   node client.js publish   --address A --topic T --records N --size B --per-request K
//                            [--key-prefix P] [--header k=v]... [--partition P]
//                            [--big-record INDEX:BYTES] [--timeout S]
//   node client.js subscribe --address A --topic T [--topic T2]... --from earliest|latest|timestamp:MS
//                            --count N [--max-batch M] [--timeout S] [--position T:P:O]...
//                            [--group G] [--cancel-after N] [--stall-after N --resume-file F]
//                            [--result FILE]
//                            Prints one JSON line per record on stdout, READY on stderr once the
//                            initial metadata came, and at the end "RESULT {...}" on stderr (and
//                            in --result FILE): code, details, initial (metadata), skipped and
//                            positions (kbridge-skipped / kbridge-positions as lists of "T:P:X",
//                            positions null when absent), next_positions (last printed offset + 1
//                            per partition), records. --count 0 ends at the initial metadata.
//                            --cancel-after N: like --count N, but exactly N records are printed
//                            (the rest of the last response is dropped) and the exit status is 0.
//                            --stall-after N: after N records stop reading (STALLED N on stderr)
//                            until FILE exists (RESUMED), then read on.
//   node client.js rate      --address A --topic T --records N --size B --per-request K [--streams S]
//   node client.js stream    --address A --topic T --records N --size B --per-request K
//                            [publish options] [--empty-topic INDEX]... [--bad-partition INDEX:P]...
//                            PublishStream: prints {code, details, seqs, results} where results
//                            has [record, sequence, partition, offset, code, error] per record
//
// Addresses are grpc-js targets: host:port or unix:/path. Run with
// NODE_PATH=$NODE_MODULES when node_modules is not next to this file.
// The .proto is found in $PROTO_DIR (or --proto-dir), else in the source tree.
// Exit status: 0 success, 1 the call failed (details as JSON on stdout), 2 bad usage.
'use strict';

const path = require('path');

const USAGE = `usage: client.js publish|subscribe|rate [options]
  common:    --address A (host:port or unix:/path)  --proto-dir DIR  --timeout SECONDS (default 60)
  publish:   --topic T --records N --size B --per-request K [--key-prefix P] [--header k=v]...
             [--partition P] [--big-record INDEX:BYTES]
  subscribe: --topic T [--topic T2]... --from earliest|latest|timestamp:MS --count N [--max-batch M]
             [--position T:P:O]... [--group G] [--cancel-after N] [--stall-after N --resume-file F]
             [--result FILE]
  rate:      --topic T --records N --size B --per-request K [--streams S]
  stream:    publish options and [--empty-topic INDEX]... [--bad-partition INDEX:P]...`;

// Options that may be given more than once collect into arrays.
const REPEATABLE = new Set(['topic', 'header', 'empty-topic', 'bad-partition', 'position']);
const KNOWN = new Set(['address', 'proto-dir', 'timeout', 'topic', 'records', 'size',
	'per-request', 'key-prefix', 'header', 'partition', 'big-record', 'from', 'count',
	'max-batch', 'streams', 'empty-topic', 'bad-partition', 'position', 'group',
	'cancel-after', 'stall-after', 'resume-file', 'result']);

function usage(msg) {
	process.stderr.write(`client.js: ${msg}\n${USAGE}\n`);
	process.exit(2);
}

function parseArgs(argv) {
	const opts = { header: [], topic: [], 'empty-topic': [], 'bad-partition': [], position: [] };
	for (let i = 0; i < argv.length; i++) {
		const a = argv[i];
		if (!a.startsWith('--'))
			usage(`unexpected argument '${a}'`);
		const name = a.slice(2);
		if (!KNOWN.has(name))
			usage(`unknown option '${a}'`);
		if (i + 1 >= argv.length)
			usage(`option '${a}' needs a value`);
		const v = argv[++i];
		if (REPEATABLE.has(name))
			opts[name].push(v);
		else
			opts[name] = v;
	}
	return opts;
}

function intOpt(opts, name, dflt, min) {
	if (opts[name] === undefined) {
		if (dflt === undefined)
			usage(`--${name} is required`);
		return dflt;
	}
	const s = opts[name];
	if (!/^\d+$/.test(s) || Number(s) < min)
		usage(`--${name} must be an integer >= ${min}, not '${s}'`);
	return Number(s);
}

function strOpt(opts, name) {
	if (opts[name] === undefined || opts[name] === '')
		usage(`--${name} is required`);
	return opts[name];
}

function loadBridge(opts, channelOptions) {
	let grpc, protoLoader;
	try {
		grpc = require('@grpc/grpc-js');
		protoLoader = require('@grpc/proto-loader');
	} catch (e) {
		process.stderr.write(`client.js: cannot load @grpc/grpc-js or @grpc/proto-loader ` +
			`(run npm ci in tests/clients/node, or set NODE_PATH): ${e.message}\n`);
		process.exit(1);
	}
	const protoDir = opts['proto-dir'] || process.env.PROTO_DIR ||
		path.join(__dirname, '..', '..', '..', 'proto');
	const def = protoLoader.loadSync('kbridge/v1/bridge.proto', {
		includeDirs: [protoDir],
		keepCase: true,
		longs: String,
		enums: String,
		bytes: Buffer,
		defaults: true,
		oneofs: true,
	});
	const pkg = grpc.loadPackageDefinition(def);
	const address = strOpt(opts, 'address');
	// Large messages are the point of some tests; the server sets the real limit.
	const client = new pkg.kbridge.v1.Bridge(address, grpc.credentials.createInsecure(), {
		'grpc.max_send_message_length': -1,
		'grpc.max_receive_message_length': -1,
		...(channelOptions || {}),
	});
	return { grpc, client };
}

function deadlineFrom(opts) {
	const secs = intOpt(opts, 'timeout', 60, 1);
	return new Date(Date.now() + secs * 1000);
}

// Kafka headers given as k=v; the value may contain '=' and may be empty.
function parseHeaders(list) {
	return list.map((h) => {
		const eq = h.indexOf('=');
		if (eq <= 0)
			usage(`--header wants key=value, not '${h}'`);
		return { key: h.slice(0, eq), value: Buffer.from(h.slice(eq + 1)) };
	});
}

// A value of exactly `size` bytes that starts with the record's index, so that
// every record of a run is distinct and tests can find each one in Kafka.
function valueFor(index, size) {
	const tag = `v${index}-`;
	if (tag.length >= size)
		return Buffer.from(tag.slice(0, size));
	return Buffer.from(tag + 'x'.repeat(size - tag.length));
}

// The error as the tests see it: status code, message and how many leading
// requests kbridge says were durable (null when the trailer is absent).
function errorJson(err) {
	let durable = null;
	if (err.metadata) {
		const v = err.metadata.get('kbridge-durable-requests');
		if (v.length > 0)
			durable = Number(v[0].toString());
	}
	return JSON.stringify({ code: err.code, details: err.details, durable });
}

// Writes the requests of one Publish stream, honouring back-pressure: write()
// returning false means grpc-js buffers are full, so wait for 'drain' (or for
// the call to end early, as it does when the server rejects a record).
function writeAll(call, requests, state) {
	return new Promise((resolve) => {
		let i = 0;
		const pump = () => {
			while (i < requests.count && !state.done) {
				const ok = call.write(requests.make(i++));
				if (!ok) {
					call.once('drain', pump);
					return;
				}
			}
			if (!state.done)
				call.end();
			resolve();
		};
		state.onDone = resolve;
		pump();
	});
}

// One Publish call; resolves to { err, response }.
function publishOnce(client, opts, requests) {
	return new Promise((resolve) => {
		const state = { done: false, onDone: null };
		const call = client.Publish({ deadline: deadlineFrom(opts) }, (err, response) => {
			state.done = true;
			if (state.onDone)
				state.onDone();
			resolve({ err, response });
		});
		writeAll(call, requests, state);
	});
}

// Builds request i on demand so that 200,000 records need not sit in memory.
function publishRequests(opts, reuseValue) {
	// Exactly one topic; an empty one is allowed, to test the daemon's check.
	if (opts.topic.length !== 1)
		usage('publish takes exactly one --topic');
	const topic = opts.topic[0];
	const records = intOpt(opts, 'records', undefined, 0);
	const size = intOpt(opts, 'size', 100, 0);
	const perRequest = intOpt(opts, 'per-request', 1, 1);
	const keyPrefix = opts['key-prefix'];
	const headers = parseHeaders(opts.header);
	const partition = opts.partition === undefined ? undefined : intOpt(opts, 'partition', 0, 0);
	let bigIndex = -1, bigSize = 0;
	if (opts['big-record'] !== undefined) {
		const m = /^(\d+):(\d+)$/.exec(opts['big-record']);
		if (!m)
			usage(`--big-record wants INDEX:BYTES, not '${opts['big-record']}'`);
		bigIndex = Number(m[1]);
		bigSize = Number(m[2]);
	}
	// Single spoilt records, to test per-record results (stream command).
	const emptyTopic = new Set(opts['empty-topic'].map((s) => {
		if (!/^\d+$/.test(s))
			usage(`--empty-topic wants an INDEX, not '${s}'`);
		return Number(s);
	}));
	const badPartition = new Map(opts['bad-partition'].map((s) => {
		const m = /^(\d+):(\d+)$/.exec(s);
		if (!m)
			usage(`--bad-partition wants INDEX:PARTITION, not '${s}'`);
		return [Number(m[1]), Number(m[2])];
	}));
	const shared = reuseValue ? valueFor(0, size) : null;
	const record = (n) => {
		const r = { topic: emptyTopic.has(n) ? '' : topic,
			value: n === bigIndex ? valueFor(n, bigSize) : (shared || valueFor(n, size)) };
		if (keyPrefix !== undefined)
			r.key = Buffer.from(keyPrefix + n);
		if (headers.length > 0)
			r.headers = headers;
		if (partition !== undefined)
			r.partition = partition;
		if (badPartition.has(n))
			r.partition = badPartition.get(n);
		return r;
	};
	return {
		records,
		count: Math.ceil(records / perRequest),
		numbers(i) {
			const first = i * perRequest;
			const last = Math.min(records, first + perRequest);
			return Array.from({ length: last - first }, (_, k) => first + k);
		},
		make(i) {
			const first = i * perRequest;
			const last = Math.min(records, first + perRequest);
			const list = [];
			for (let n = first; n < last; n++)
				list.push(record(n));
			return { records: list };
		},
	};
}

async function cmdPublish(opts) {
	const { client } = loadBridge(opts);
	const { err, response } = await publishOnce(client, opts, publishRequests(opts, false));
	client.close();
	if (err) {
		process.stdout.write(errorJson(err) + '\n');
		process.exitCode = 1;
		return;
	}
	process.stdout.write(JSON.stringify(response) + '\n');
}

// Publishes as fast as one process can, over --streams concurrent streams,
// and reports what the daemon acknowledged per second. For measuring by hand.
async function cmdRate(opts) {
	const { client } = loadBridge(opts);
	const streams = intOpt(opts, 'streams', 1, 1);
	const requests = publishRequests(opts, true);
	const start = process.hrtime.bigint();
	const results = await Promise.all(Array.from({ length: streams },
		() => publishOnce(client, opts, requests)));
	const secs = Number(process.hrtime.bigint() - start) / 1e9;
	client.close();
	const failed = results.find((r) => r.err);
	if (failed) {
		process.stdout.write(errorJson(failed.err) + '\n');
		process.exitCode = 1;
		return;
	}
	const acked = results.reduce((sum, r) => sum + Number(r.response.records), 0);
	process.stdout.write(JSON.stringify({
		records: acked,
		requests: requests.count * streams,
		seconds: Number(secs.toFixed(3)),
		records_per_s: Math.round(acked / secs),
		requests_per_s: Math.round(requests.count * streams / secs),
	}) + '\n');
}

// One PublishStream call: writes every request (with back-pressure), half-closes,
// and collects every ack. Resolves to { err, seqs, results }.
function streamOnce(client, opts, requests) {
	return new Promise((resolve) => {
		const seqs = [], results = [];
		const state = { done: false, onDone: null };
		const call = client.PublishStream({ deadline: deadlineFrom(opts) });
		const end = (err) => {
			if (state.done)
				return;
			state.done = true;
			if (state.onDone)
				state.onDone();
			resolve({ err, seqs, results });
		};
		call.on('data', (ack) => {
			const seq = Number(ack.sequence);
			const numbers = seq < requests.count ? requests.numbers(seq) : [];
			seqs.push(seq);
			ack.results.forEach((r, j) => results.push([numbers[j] === undefined ? null : numbers[j],
				seq, r.partition, Number(r.offset), r.code, r.error]));
		});
		call.on('error', (err) => end(err));
		// 'status' comes after the last 'data' and, for OK, without an 'error'.
		call.on('status', (st) => {
			if (st.code === 0)
				end(null);
		});
		writeAll(call, requests, state);
	});
}

async function cmdStream(opts) {
	const { client } = loadBridge(opts);
	const { err, seqs, results } = await streamOnce(client, opts, publishRequests(opts, false));
	client.close();
	const out = err ? JSON.parse(errorJson(err)) : { code: 0, details: '', durable: null };
	out.seqs = seqs;
	out.results = results;
	process.stdout.write(JSON.stringify(out) + '\n');
	if (err)
		process.exitCode = 1;
}

// A received record as one JSON line; keys and values are shown as UTF-8 text
// (the tests publish text) and 64-bit numbers as JSON numbers.
function recordJson(r) {
	return JSON.stringify({
		topic: r.topic,
		partition: r.partition,
		offset: Number(r.offset),
		timestamp_ms: Number(r.timestamp_ms),
		key: r.key.toString(),
		value: r.value.toString(),
		headers: r.headers.map((h) => ({ key: h.key, value: h.value.toString() })),
	});
}

// --from earliest|latest|timestamp:MS as the request's start fields.
function startFrom(from) {
	if (from === 'earliest' || from === 'latest')
		return { start: from.toUpperCase(), start_timestamp_ms: '0' };
	const m = /^timestamp:(\d+)$/.exec(from);
	if (!m)
		usage(`--from must be earliest, latest or timestamp:MS, not '${from}'`);
	return { start: 'TIMESTAMP', start_timestamp_ms: m[1] };
}

// --position TOPIC:PARTITION:OFFSET (the topic is everything before the last two colons).
function parsePosition(s) {
	const m = /^(.+):(\d+):(\d+)$/.exec(s);
	if (!m)
		usage(`--position wants TOPIC:PARTITION:OFFSET, not '${s}'`);
	return { topic: m[1], partition: Number(m[2]), offset: m[3] };
}

// The first value of a metadata key as text, or undefined.
function mdValue(md, key) {
	if (!md)
		return undefined;
	const v = md.get(key);
	return v.length > 0 ? v[0].toString() : undefined;
}

// "T:P:X,..." as a list; [] for none.
function listOf(text) {
	return (text || '').split(',').filter((x) => x !== '');
}

function cmdSubscribe(opts) {
	if (opts.topic.length === 0)
		usage('--topic is required');
	const start = startFrom(strOpt(opts, 'from'));
	const cancelAfter = opts['cancel-after'] === undefined ? undefined : intOpt(opts, 'cancel-after', 0, 1);
	const count = cancelAfter !== undefined ? cancelAfter : intOpt(opts, 'count', undefined, 0);
	const maxBatch = intOpt(opts, 'max-batch', 0, 0);
	const stallAfter = opts['stall-after'] === undefined ? undefined : intOpt(opts, 'stall-after', 0, 0);
	if ((stallAfter === undefined) !== (opts['resume-file'] === undefined))
		usage('--stall-after and --resume-file go together');
	const fs = require('fs');
	const { client } = loadBridge(opts, stallAfter === undefined ? {} :
		{ 'grpc.http2.lookahead_bytes': 16384 });
	const req = { topics: opts.topic, ...start, max_batch: maxBatch,
		positions: opts.position.map(parsePosition), group: opts.group || '' };
	let seen = 0, finished = false, stalled = false, initial = null, status = null;
	const nextPos = new Map();
	const call = client.Subscribe(req, { deadline: deadlineFrom(opts) });
	const result = (code, details, trailers) => {
		const res = { code, details, records: seen, initial: initial || {},
			skipped: listOf(mdValue(initial, 'kbridge-skipped') || mdValue(trailers, 'kbridge-skipped')),
			positions: mdValue(trailers, 'kbridge-positions') === undefined ? null :
				listOf(mdValue(trailers, 'kbridge-positions')),
			next_positions: [...nextPos.entries()].map(([k, v]) => `${k}:${v}`).sort() };
		if (initial)
			res.initial = Object.fromEntries(Object.entries(initial.getMap()).map(([k, v]) => [k, v.toString()]));
		return res;
	};
	const finish = (code, res, errLine) => {
		if (finished)
			return;
		finished = true;
		call.cancel();
		client.close();
		process.exitCode = code;
		if (errLine)
			process.stdout.write(errLine + '\n');
		const text = JSON.stringify(res);
		process.stderr.write(`RESULT ${text}\n`);
		if (opts.result)
			fs.writeFileSync(opts.result, text + '\n');
	};
	// Stops reading (grpc-js then stops granting HTTP/2 window) until the file exists.
	const stallIfDue = () => {
		if (stallAfter === undefined || stalled || seen < stallAfter)
			return;
		stalled = true;
		call.pause();
		process.stderr.write(`STALLED ${seen}\n`);
		const poll = setInterval(() => {
			if (!fs.existsSync(opts['resume-file']))
				return;
			clearInterval(poll);
			process.stderr.write('RESUMED\n');
			call.resume();
		}, 50);
	};
	// Initial metadata comes only once the start offsets are fixed: from here on
	// every record published is ours to receive. Tests wait for this line.
	call.on('metadata', (md) => {
		initial = md;
		process.stderr.write('READY\n');
		if (count === 0)
			finish(0, result(0, 'stopped by the client (count 0)', null));
		else
			stallIfDue();
	});
	call.on('data', (resp) => {
		if (finished)
			return;
		const lines = [];
		for (const r of resp.records) {
			if (seen >= count)
				break;
			lines.push(recordJson(r));
			nextPos.set(`${r.topic}:${r.partition}`, Number(r.offset) + 1);
			seen++;
		}
		if (lines.length > 0)
			process.stdout.write(lines.join('\n') + '\n');
		if (seen >= count)
			finish(0, result(0, 'stopped by the client (count)', null));
		else
			stallIfDue();
	});
	call.on('status', (st) => {
		status = st;
	});
	call.on('error', (err) => {
		if (!finished)
			finish(1, result(err.code, err.details, err.metadata), errorJson(err));
	});
	call.on('end', () => {
		// 'end' may come before 'status': let the status arrive first.
		setImmediate(() => {
			if (finished)
				return;
			const st = status || { code: null, details: '', metadata: null };
			finish(1, result(st.code, `stream ended after ${seen} of ${count} records`, st.metadata),
				JSON.stringify({ code: st.code, details: `stream ended after ${seen} of ${count} records`, durable: null }));
		});
	});
}

function main() {
	const [cmd, ...rest] = process.argv.slice(2);
	const commands = { publish: cmdPublish, subscribe: cmdSubscribe, rate: cmdRate, stream: cmdStream };
	if (!commands[cmd])
		usage(cmd ? `unknown command '${cmd}'` : 'no command given');
	const r = commands[cmd](parseArgs(rest));
	if (r instanceof Promise)
		r.catch((e) => {
			process.stderr.write(`client.js: ${e.stack || e}\n`);
			process.exit(1);
		});
}

main();
