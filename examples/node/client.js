#!/usr/bin/env node
// An example Node.js client of the nextbest gRPC server.
//
// It loads the contract from protos/ at run time with @grpc/proto-loader (no generated code). The
// standard grpc.health.v1 health.proto is read from the `grpc-health-check` package (pinned in
// package.json, checked by package-lock.json), which ships the grpc project's copy of the file:
// no copy of it to keep up to date here, and only the .proto file is used, not the package's code.
//
// Each answer is printed to stdout as one JSON line: {"rpc": "<service>/<method>", "response":
// {...}}, with the .proto's field names and enum value names; scalar fields appear with their
// default when unset, unset messages are null and unset `optional` fields are left out. Failures
// are one line on stderr ("error: ...") and a non-zero exit: 1 when a call fails or the server is
// not serving, 2 for bad arguments.
//
//   node client.js health [--wait 30]
//   node client.js recommend --customer c004 --limit 5 --channel web
//   node client.js score --customer c004 --content guide-home --content news-p020
//   node client.js stream --customer c004 --customer c005 [--customers-file ids.txt]
//   node client.js similar --product p004 [--product p006] [--limit 5]
//   node client.js explain --customer c004 --product p006 [--limit 5 --channel web ...]
//   node client.js export --customer c004 --source preference-centre
//
// Connection options (every command): --address HOST:PORT (NEXTBEST_ADDRESS, 127.0.0.1:50051),
// --ca-file PEM (NEXTBEST_CA_FILE: TLS trusting this CA), --tls (TLS trusting the system CAs),
// --client-cert / --client-key PEM (NEXTBEST_CLIENT_CERT / NEXTBEST_CLIENT_KEY: mutual TLS),
// --token TOKEN (NEXTBEST_TOKEN: sent as `authorization: Bearer <token>`; prefer the environment,
// a command line is visible to other users), --timeout SECONDS (deadline of every call, 10; for
// `stream`, of the whole stream).
'use strict';

const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: node client.js COMMAND [options]

commands (each answer is one JSON line on stdout):
  health     grpc.health.v1.Health/Check          [--service NAME] [--wait SECONDS]
  recommend  Recommender.RecommendProducts        --customer ID [filters]
  stream     Recommender.StreamRecommendations    --customer ID ... | --customers-file PATH|-
             [filters]: one request per customer, request_id 1, 2, ...; the answers are
             checked to come in request order
  score      Recommender.ScoreContent             --customer ID --content ID ... [--channel C]
  similar    Recommender.SimilarProducts          --product ID ... [--limit N] [--customer ID]
  explain    Recommender.ExplainRecommendation    --customer ID --product ID [filters]: why the
             product is or is not in the answer RecommendProducts gives with these filters
  export     Consent.ExportCustomerData           --customer ID --source WHO: everything held
             about the customer, the streamed sections assembled into one JSON document

filters: --limit N  --channel email|web|app  --include-category C ...  --exclude-category C ...
         --exclude-product ID ...  --include-purchased  --request-id ID (recommend only)

connection (flags win over the environment):
  --address HOST:PORT   NEXTBEST_ADDRESS       default 127.0.0.1:50051
  --ca-file PEM         NEXTBEST_CA_FILE       TLS, trusting this CA (else plaintext)
  --tls                                        TLS, trusting the system's CAs
  --client-cert PEM     NEXTBEST_CLIENT_CERT   mutual TLS: this client's certificate chain ...
  --client-key PEM      NEXTBEST_CLIENT_KEY    ... and its private key
  --token TOKEN         NEXTBEST_TOKEN         bearer token (authorization metadata)
  --timeout SECONDS                            deadline of each call (default 10)
  --protos DIR                                 the .proto files (default: this repo's protos/)

exit codes: 0 ok, 1 a call failed or the server is not serving, 2 bad arguments`;

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  address: { type: 'string' },
  'ca-file': { type: 'string' },
  tls: { type: 'boolean' },
  'client-cert': { type: 'string' },
  'client-key': { type: 'string' },
  token: { type: 'string' },
  timeout: { type: 'string' },
  protos: { type: 'string' },
  // commands
  service: { type: 'string' },
  wait: { type: 'string' },
  customer: { type: 'string', multiple: true },
  'customers-file': { type: 'string' },
  limit: { type: 'string' },
  channel: { type: 'string' },
  'include-category': { type: 'string', multiple: true },
  'exclude-category': { type: 'string', multiple: true },
  'exclude-product': { type: 'string', multiple: true },
  'include-purchased': { type: 'boolean' },
  'request-id': { type: 'string' },
  content: { type: 'string', multiple: true },
  product: { type: 'string', multiple: true },
  source: { type: 'string' },
};
const CONNECTION = ['help', 'address', 'ca-file', 'tls', 'client-cert', 'client-key', 'token',
  'timeout', 'protos'];
const FILTERS = ['limit', 'channel', 'include-category', 'exclude-category', 'exclude-product',
  'include-purchased'];
const COMMANDS = {
  health: ['service', 'wait'],
  recommend: ['customer', 'request-id', ...FILTERS],
  stream: ['customer', 'customers-file', ...FILTERS],
  score: ['customer', 'content', 'channel'],
  similar: ['product', 'limit', 'customer'],
  explain: ['customer', 'product', ...FILTERS],
  export: ['customer', 'source'],
};
const CHANNELS = { email: 'CHANNEL_EMAIL', web: 'CHANNEL_WEB', app: 'CHANNEL_APP' };
const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto files (customer_id, not customerId)
  longs: String, // int64 as decimal strings, as the proto3 JSON mapping does
  enums: String, // enum values by name
  defaults: true, // unset scalar fields with their default (personalized: false, withheld: 0)
  oneofs: false,
};
const METHOD = {
  health: 'grpc.health.v1.Health/Check',
  recommend: 'nextbest.v1.Recommender/RecommendProducts',
  stream: 'nextbest.v1.Recommender/StreamRecommendations',
  score: 'nextbest.v1.Recommender/ScoreContent',
  similar: 'nextbest.v1.Recommender/SimilarProducts',
  explain: 'nextbest.v1.Recommender/ExplainRecommendation',
  export: 'nextbest.v1.Consent/ExportCustomerData',
};

class UsageError extends Error {}
class Failure extends Error {}

// --- arguments ---------------------------------------------------------------------------------

function parse(argv, env) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(`${err.message} (see --help)`);
  }
  const { values, positionals } = parsed;
  if (values.help) return { help: true };
  if (positionals.length !== 1 || !(positionals[0] in COMMANDS)) {
    const got = positionals.length ? `'${positionals.join(' ')}'` : 'none';
    const names = Object.keys(COMMANDS).join(', ');
    throw new UsageError(`one command of ${names} is required (got ${got}; see --help)`);
  }
  const command = positionals[0];
  for (const name of Object.keys(values)) {
    if (!CONNECTION.includes(name) && !COMMANDS[command].includes(name)) {
      throw new UsageError(`--${name} is not an option of ${command} (see --help)`);
    }
  }
  const opts = {
    command,
    values,
    address: values.address || env.NEXTBEST_ADDRESS || '127.0.0.1:50051',
    caFile: values['ca-file'] || env.NEXTBEST_CA_FILE || '',
    tls: Boolean(values.tls),
    clientCert: values['client-cert'] || env.NEXTBEST_CLIENT_CERT || '',
    clientKey: values['client-key'] || env.NEXTBEST_CLIENT_KEY || '',
    token: values.token || env.NEXTBEST_TOKEN || '',
    timeoutS: number('--timeout', values.timeout ?? '10', { positive: true }),
    protos: values.protos || path.resolve(__dirname, '..', '..', 'protos'),
  };
  if (Boolean(opts.clientCert) !== Boolean(opts.clientKey)) {
    throw new UsageError('--client-cert and --client-key go together');
  }
  return opts;
}

function number(flag, text, { positive = false, integer = false } = {}) {
  const value = Number(text);
  const ok = text !== '' && Number.isFinite(value) && (!integer || Number.isInteger(value))
    && (!positive || value > 0);
  if (!ok) {
    const kind = integer ? 'integer' : 'number';
    const what = positive ? `a positive ${kind}` : integer ? 'an integer' : 'a number';
    throw new UsageError(`${flag} must be ${what} (got '${text}')`);
  }
  return value;
}

function readFile(flag, file) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new UsageError(`${flag}: cannot read ${file} (${err.code || err.message})`);
  }
}

function one(values, flag) {
  const list = values[flag] || [];
  if (list.length !== 1) throw new UsageError(`--${flag} is required once (got ${list.length})`);
  return list[0];
}

/** The fields of a RecommendProductsRequest given by the filter flags. */
function filters(values) {
  const fields = {
    include_categories: values['include-category'] || [],
    exclude_categories: values['exclude-category'] || [],
    exclude_product_ids: values['exclude-product'] || [],
    include_purchased: Boolean(values['include-purchased']),
  };
  if (values.limit !== undefined) fields.limit = number('--limit', values.limit, { integer: true });
  if (values.channel !== undefined) fields.channel = channel(values.channel);
  return fields;
}

function channel(name) {
  const value = CHANNELS[name.toLowerCase()];
  if (!value) {
    const names = Object.keys(CHANNELS).join(', ');
    throw new UsageError(`--channel must be one of ${names} (got '${name}')`);
  }
  return value;
}

// --- connection --------------------------------------------------------------------------------

function load(protos) {
  const recommender = path.join(protos, 'nextbest', 'v1', 'recommender.proto');
  if (!fs.existsSync(recommender)) {
    throw new UsageError(`--protos: ${recommender} not found`);
  }
  const health = require.resolve('grpc-health-check/proto/health/v1/health.proto');
  const files = ['nextbest/v1/recommender.proto', 'nextbest/v1/consent.proto',
    'health/v1/health.proto'];
  const definition = protoLoader.loadSync(files, {
    ...LOADER_OPTIONS,
    includeDirs: [protos, path.resolve(path.dirname(health), '..', '..')],
  });
  return grpc.loadPackageDefinition(definition);
}

function pem(flag, file, label) {
  const data = readFile(flag, file);
  if (!new RegExp(`-----BEGIN [A-Z ]*${label}-----`).test(data.toString('latin1'))) {
    throw new UsageError(`${flag}: ${file} is not a PEM file (no BEGIN ${label} line)`);
  }
  return data;
}

function credentials(opts) {
  if (!opts.tls && !opts.caFile && !opts.clientCert) return grpc.credentials.createInsecure();
  // grpc-js gives the address's host to TLS as the server name even when it is an IP address
  // (grpc/grpc-node#1919), and Node warns about that (DEP0123) on stderr. The certificate is
  // still checked against the address, so this one warning is dropped.
  const emitWarning = process.emitWarning;
  process.emitWarning = function (warning, ...rest) {
    const code = typeof rest[0] === 'object' && rest[0] !== null ? rest[0].code : rest[1];
    if (code !== 'DEP0123') emitWarning.call(process, warning, ...rest);
  };
  const ca = opts.caFile ? pem('--ca-file', opts.caFile, 'CERTIFICATE') : null;
  const key = opts.clientKey ? pem('--client-key', opts.clientKey, 'PRIVATE KEY') : null;
  const cert = opts.clientCert ? pem('--client-cert', opts.clientCert, 'CERTIFICATE') : null;
  return grpc.credentials.createSsl(ca, key, cert);
}

// gRPC's own retries, as the Python client: UNAVAILABLE (no server yet, a replica draining) and
// RESOURCE_EXHAUSTED (the server's admission control), after the server's
// grpc-retry-pushback-ms when it sends one (grpc-js honours it), else with backoff.
const RETRY_OPTIONS = {
  'grpc.enable_retries': 1,
  'grpc.service_config': JSON.stringify({
    methodConfig: [{
      name: [{ service: 'nextbest.v1.Recommender' }, { service: 'nextbest.v1.Consent' }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: '0.1s',
        maxBackoff: '2s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE', 'RESOURCE_EXHAUSTED'],
      },
    }],
  }),
};

function connect(opts) {
  const loaded = load(opts.protos);
  const creds = credentials(opts);
  if (opts.token && !opts.tls && !opts.caFile && !opts.clientCert) {
    process.stderr.write('warning: the bearer token goes over plaintext (no --ca-file or --tls)\n');
  }
  let recommender;
  let health;
  let consent;
  try {
    recommender = new loaded.nextbest.v1.Recommender(opts.address, creds, RETRY_OPTIONS);
    // One channel (one connection) for every service.
    const channelOverride = recommender.getChannel();
    health = new loaded.grpc.health.v1.Health(opts.address, creds, { channelOverride });
    consent = new loaded.nextbest.v1.Consent(opts.address, creds, { channelOverride });
  } catch (err) {
    throw new UsageError(`--address: ${err.message}`);
  }
  const metadata = () => {
    const md = new grpc.Metadata();
    if (opts.token) md.set('authorization', `Bearer ${opts.token}`);
    return md;
  };
  const deadline = () => Date.now() + opts.timeoutS * 1000;
  return {
    recommender, health, consent, metadata, deadline, close: () => recommender.close(),
  };
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

/** A gRPC error as one line: the status name, the server's message and what to check. */
function describe(method, err, opts) {
  const details = String(err.details || err.message)
    .replace(/\s+/g, ' ')
    .replace(/ Resolution note: ?$/, '')
    .trim();
  const tls = opts.tls || opts.caFile || opts.clientCert;
  const unavailable = err.code === grpc.status.UNAVAILABLE;
  let hint = '';
  if (unavailable && /Name resolution failed/.test(details)) {
    hint = ' (check --address or NEXTBEST_ADDRESS)';
  } else if (unavailable && tls && /wrong version number|packet length/i.test(details)) {
    hint = ' (the server does not answer TLS: a plaintext server needs no --ca-file or --tls)';
  } else if (unavailable && tls && /certificate|self.signed|altnames|SSL|TLS/i.test(details)) {
    hint = ' (the server\'s certificate is not trusted: check --ca-file and --address)';
  } else if (unavailable && /ECONNREFUSED|No connection established/.test(details)) {
    hint = ` (is the server running on ${opts.address}?`
      + (tls ? ')' : ' with TLS, give --ca-file or --tls)');
  } else if (err.code === grpc.status.UNAUTHENTICATED) {
    hint = opts.token ? ' (the token was refused)' : ' (give a token: --token or NEXTBEST_TOKEN)';
  } else if (err.code === grpc.status.DEADLINE_EXCEEDED) {
    hint = ` (deadline: --timeout ${opts.timeoutS} s)`;
  }
  return new Failure(`${method}: ${statusName(err.code)}: ${details}${hint}`);
}

function unary(conn, client, name, request, method, opts) {
  return new Promise((resolve, reject) => {
    client[name](request, conn.metadata(), { deadline: conn.deadline() }, (err, response) => {
      if (err) reject(describe(method, err, opts));
      else resolve(response);
    });
  });
}

function emit(method, response) {
  process.stdout.write(`${JSON.stringify({ rpc: method, response })}\n`);
}

// --- commands ----------------------------------------------------------------------------------

async function health(conn, opts) {
  const waitS = opts.values.wait === undefined ? 0 : number('--wait', opts.values.wait);
  const until = Date.now() + waitS * 1000;
  const request = { service: opts.values.service || '' };
  for (;;) {
    let response = null;
    let failure = null;
    try {
      response = await unary(conn, conn.health, 'Check', request, METHOD.health, opts);
    } catch (err) {
      failure = err;
    }
    if (response && response.status === 'SERVING') {
      emit(METHOD.health, response);
      return;
    }
    if (Date.now() >= until) {
      if (failure) throw failure;
      emit(METHOD.health, response);
      const what = request.service ? `service '${request.service}'` : 'the server';
      throw new Failure(`${METHOD.health}: ${what} at ${opts.address} is ${response.status}, `
        + `not SERVING${waitS ? ` after ${waitS} s` : ''}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function recommend(conn, opts) {
  const request = { customer_id: one(opts.values, 'customer'), ...filters(opts.values) };
  if (opts.values['request-id'] !== undefined) request.request_id = opts.values['request-id'];
  const response = await unary(conn, conn.recommender, 'RecommendProducts', request,
    METHOD.recommend, opts);
  emit(METHOD.recommend, response);
}

async function score(conn, opts) {
  const content = opts.values.content || [];
  if (!content.length) throw new UsageError('--content is required (one or more content ids)');
  const request = {
    customer_id: one(opts.values, 'customer'),
    candidates: content.map((id) => ({ content_id: id })),
  };
  if (opts.values.channel !== undefined) request.channel = channel(opts.values.channel);
  const response = await unary(conn, conn.recommender, 'ScoreContent', request, METHOD.score, opts);
  emit(METHOD.score, response);
}

async function similar(conn, opts) {
  const products = opts.values.product || [];
  if (!products.length) throw new UsageError('--product is required (one or more product ids)');
  const request = { product_ids: products };
  if (opts.values.limit !== undefined) {
    request.limit = number('--limit', opts.values.limit, { integer: true });
  }
  if (opts.values.customer !== undefined) request.customer_id = one(opts.values, 'customer');
  const response = await unary(conn, conn.recommender, 'SimilarProducts', request,
    METHOD.similar, opts);
  emit(METHOD.similar, response);
}

async function explain(conn, opts) {
  const request = {
    customer_id: one(opts.values, 'customer'),
    product_id: one(opts.values, 'product'),
    ...filters(opts.values),
  };
  const response = await unary(conn, conn.recommender, 'ExplainRecommendation', request,
    METHOD.explain, opts);
  emit(METHOD.explain, response);
}

/** The export's sections, streamed, assembled into the one JSON document: "export" holds the
 * top-level fields, a `page` chunk is appended to its list, any other chunk is the value. */
function exportData(conn, opts) {
  const request = { customer_id: one(opts.values, 'customer'), source: opts.values.source || '' };
  return new Promise((resolve, reject) => {
    const call = conn.consent.ExportCustomerData(request, conn.metadata(),
      { deadline: conn.deadline() });
    const document = {};
    call.on('data', (chunk) => {
      const value = JSON.parse(chunk.json);
      if (chunk.section === 'export') Object.assign(document, value);
      else if (chunk.page) document[chunk.section] = (document[chunk.section] || []).concat(value);
      else document[chunk.section] = value;
    });
    call.on('error', (err) => reject(describe(METHOD.export, err, opts)));
    call.on('end', () => {
      emit(METHOD.export, document);
      resolve();
    });
  });
}

function customersOf(values) {
  const customers = [...(values.customer || [])];
  const file = values['customers-file'];
  if (file !== undefined) {
    const text = readFile('--customers-file', file === '-' ? 0 : file).toString('utf8');
    customers.push(...text.split(/\r?\n/).map((s) => s.trim()).filter(Boolean));
  }
  if (!customers.length) {
    throw new UsageError('stream needs --customer (repeatable) or --customers-file');
  }
  return customers;
}

/** One request per customer, written while the answers are read; the answers must come in
 * request order. A request that failed inside the stream is printed (its `error` is set), and
 * makes the exit code 1 once the stream is done. */
function stream(conn, opts) {
  const shared = filters(opts.values);
  const requests = customersOf(opts.values).map((customer, i) => ({
    customer_id: customer,
    request_id: String(i + 1),
    ...shared,
  }));
  return new Promise((resolve, reject) => {
    const call = conn.recommender.StreamRecommendations(conn.metadata(),
      { deadline: conn.deadline() });
    let answered = 0;
    let outOfOrder = null;
    const failed = [];
    call.on('data', (response) => {
      const expected = requests[answered];
      const label = (r) => `request '${r.request_id}' (customer '${r.customer_id}')`;
      if (!outOfOrder && (!expected || response.request_id !== expected.request_id
          || response.customer_id !== expected.customer_id)) {
        outOfOrder = new Failure(`${METHOD.stream}: answer ${answered + 1} is for `
          + `${label(response)}, expected ${expected ? label(expected) : 'no more answers'}`);
      }
      emit(METHOD.stream, response);
      if (response.error) failed.push(response);
      answered += 1;
    });
    call.on('error', (err) => reject(describe(METHOD.stream, err, opts)));
    call.on('end', () => {
      if (outOfOrder) return reject(outOfOrder);
      if (answered !== requests.length) {
        const counts = `${requests.length} requests, ${answered} answers`;
        return reject(new Failure(`${METHOD.stream}: ${counts}`));
      }
      if (failed.length) {
        const first = failed[0];
        return reject(new Failure(`${METHOD.stream}: ${failed.length} of ${requests.length} `
          + `requests failed; request ${first.request_id} (customer '${first.customer_id}'): `
          + `${statusName(first.error.code)}: ${first.error.message}`));
      }
      resolve();
    });
    (async () => {
      for (const request of requests) {
        // Respect flow control: wait for 'drain' when the send buffer is full.
        if (!call.write(request)) await new Promise((r) => call.once('drain', r));
      }
      call.end();
    })().catch((err) => call.cancel() || reject(err));
  });
}

const RUN = { health, recommend, score, similar, stream, explain, export: exportData };

async function main(argv, env) {
  let conn = null;
  try {
    const opts = parse(argv, env);
    if (opts.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    conn = connect(opts);
    await RUN[opts.command](conn, opts);
    return 0;
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n`);
      return 2;
    }
    if (err instanceof Failure) {
      process.stderr.write(`error: ${err.message}\n`);
      return 1;
    }
    process.stderr.write(`error: ${String((err && err.message) || err).replace(/\s+/g, ' ')}\n`);
    return 1;
  } finally {
    if (conn) conn.close();
  }
}

if (require.main === module) {
  // Set the exit code and let the process end by itself, so that stdout is flushed to a pipe.
  main(process.argv.slice(2), process.env).then((code) => { process.exitCode = code; });
}

module.exports = { main, parse };
