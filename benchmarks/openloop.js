#!/usr/bin/env node
// The open-loop load generator of `make bench-overload`, outside Python (grpc-js, the Node.js
// client's pinned packages in examples/node): calls Recommender.RecommendProducts on a fixed
// schedule, `--rate` per second for `--seconds`, whatever the answers, over `--channels`
// connections, each with a `--deadline` in seconds. No retries (a refusal is measured as one).
// Customer ids come one per line from `--customers`, used in turn.
//
// With `--concurrency N` instead of `--rate`: a closed loop, N callers each calling back to back
// for `--seconds` (the capacity).
//
// Prints one JSON document on stdout: {"calls": [[start s, latency ms, status name], ...],
// "late_ms_p99": ...}, where `late` is how far behind its schedule each call was started (the
// generator's own lag: near 0 while it keeps up).
//
//   node benchmarks/openloop.js --address 127.0.0.1:50051 --customers ids.txt \
//     --rate 800 --seconds 60 [--channels 4] [--deadline 5]
//   node benchmarks/openloop.js --address 127.0.0.1:50051 --customers ids.txt \
//     --concurrency 16 --seconds 10
'use strict';

const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');

const NODE = path.resolve(__dirname, '..', 'examples', 'node', 'node_modules');
const grpc = require(path.join(NODE, '@grpc', 'grpc-js'));
const protoLoader = require(path.join(NODE, '@grpc', 'proto-loader'));

function fail(message) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(2);
}

function positive(name, value) {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) fail(`--${name} must be a positive number (got ${value})`);
  return n;
}

const { values: opts } = parseArgs({
  options: {
    address: { type: 'string', default: '127.0.0.1:50051' },
    customers: { type: 'string' },
    rate: { type: 'string' },
    concurrency: { type: 'string' },
    seconds: { type: 'string' },
    channels: { type: 'string', default: '4' },
    deadline: { type: 'string', default: '5' },
  },
});
if (!opts.customers) fail('--customers FILE is required');
if (!opts.seconds || !(opts.rate || opts.concurrency)) {
  fail('--seconds and one of --rate or --concurrency are required');
}
const closed = opts.concurrency ? Math.round(positive('concurrency', opts.concurrency)) : 0;
const rate = closed ? 0 : positive('rate', opts.rate);
const seconds = positive('seconds', opts.seconds);
const channels = Math.round(positive('channels', opts.channels));
const deadline = positive('deadline', opts.deadline);
let ids;
try {
  ids = fs.readFileSync(opts.customers, 'utf8').split('\n').filter((s) => s);
} catch (err) {
  fail(`--customers: ${err.message}`);
}
if (!ids.length) fail(`--customers: ${opts.customers} has no customer id`);

const protos = path.resolve(__dirname, '..', 'protos');
const definition = protoLoader.loadSync(['nextbest/v1/recommender.proto'], {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [protos],
});
const { Recommender } = grpc.loadPackageDefinition(definition).nextbest.v1;
const STATUS = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
// Own connections (as several web back ends): SO_REUSEPORT spreads connections over processes.
const clients = Array.from({ length: channels }, (_, k) => new Recommender(
  opts.address, grpc.credentials.createInsecure(),
  { 'grpc.use_local_subchannel_pool': 1, 'grpc.enable_retries': 0, 'grpc.primary_user_agent': `openloop-${k}` },
));

const total = closed ? 0 : Math.floor(rate * seconds);
const calls = new Array(total);
const late = new Array(total);
let done = 0;
let next = 0;
const t0 = process.hrtime.bigint();
const now = () => Number(process.hrtime.bigint() - t0) / 1e9;

function call(k, then) {
  const started = process.hrtime.bigint();
  clients[k % channels].RecommendProducts(
    { customer_id: ids[k % ids.length] },
    { deadline: new Date(Date.now() + deadline * 1000) },
    (err) => then(Number(process.hrtime.bigint() - started) / 1e6,
      err ? (STATUS[err.code] || String(err.code)) : 'OK'),
  );
}

function start(k) {
  const at = k / rate;
  late[k] = Math.max(now() - at, 0) * 1000;
  call(k, (ms, code) => {
    calls[k] = [at, ms, code];
    done += 1;
    if (done === total) finish();
  });
}

function closedLoop() {
  let k = 0;
  let running = closed;
  const caller = (lane) => {
    const at = now();
    if (at >= seconds) {
      running -= 1;
      if (running === 0) finish();
      return;
    }
    call(k++, (ms, code) => {
      calls.push([at, ms, code]);
      late.push(0);
      caller(lane);
    });
  };
  for (let lane = 0; lane < closed; lane += 1) caller(lane);
}

function pump() {
  const due = Math.min(total, Math.floor(now() * rate) + 1);
  while (next < due) start(next++);
  if (next < total) setTimeout(pump, Math.max(0, (next / rate - now()) * 1000));
}

function finish() {
  if (!late.length) late.push(0);
  const sorted = late.slice().sort((a, b) => a - b);
  const p99 = sorted[Math.min(sorted.length - 1, Math.floor(0.99 * sorted.length))];
  process.stdout.write(JSON.stringify({ calls, late_ms_p99: p99 }) + '\n');
  clients.forEach((c) => c.close());
}

if (closed) closedLoop();
else if (total === 0) finish();
else pump();
