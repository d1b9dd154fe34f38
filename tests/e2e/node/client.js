// A Node.js client of meshserve's gateway, as a user of @grpc/grpc-js and
// @grpc/proto-loader writes one: the protos are loaded from protos/ with it as
// the include directory (what `protoc -I protos` does, docs/clients.md), and
// every call kind goes through the gateway. Each check prints one JSON line
// ({"check": NAME, ...what it saw}); tests/e2e/test_up.py judges them.
//
//   node client.js GATEWAY PROTOS_DIR < plan.json
//
// plan.json: {"model": "demo", "rows": [[...], ...], "dataset": "demo-blobs",
//             "upload": "name-for-a-new-dataset"}
"use strict";

const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [gateway, protosDir] = process.argv.slice(2);
const plan = JSON.parse(fs.readFileSync(0, "utf8"));
const FILES = [
  "inference/grpc_service.proto",
  "inference/model_config.proto",
  "meshserve/data/v1/data.proto",
  "meshserve/training/v1/training.proto",
  "meshserve/mesh/v1/admin.proto",
];

function emit(check, result) {
  process.stdout.write(JSON.stringify({ check, ...result }) + "\n");
}

function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

// grpc-js may emit "end" after "error": a stream's outcome is reported once, the first.
function settle(resolve, check) {
  let settled = false;
  return (result) => {
    if (settled) return;
    settled = true;
    emit(check, result);
    resolve();
  };
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

// Unary calls as promises that also resolve the response's header metadata.
function unary(client, method, request, metadata = new grpc.Metadata(), ms = 30000) {
  return new Promise((resolve, reject) => {
    let headers = null;
    const call = client[method](request, metadata, { deadline: deadline(ms) }, (err, reply) =>
      err ? reject(err) : resolve({ reply, headers }),
    );
    call.on("metadata", (md) => {
      headers = md;
    });
  });
}

function float32Bytes(rows) {
  const flat = rows.flat();
  const buffer = Buffer.alloc(flat.length * 4);
  flat.forEach((value, i) => buffer.writeFloatLE(value, i * 4));
  return buffer;
}

function float32Values(buffer) {
  const values = [];
  for (let offset = 0; offset < buffer.length; offset += 4) {
    values.push(buffer.readFloatLE(offset));
  }
  return values;
}

function reshape(values, shape) {
  const width = shape[shape.length - 1];
  const rows = [];
  for (let i = 0; i < values.length; i += width) rows.push(values.slice(i, i + width));
  return rows;
}

function inferRequest(metadata, rows, id) {
  const input = metadata.inputs[0];
  return {
    model_name: plan.model,
    id: id || "",
    inputs: [{ name: input.name, datatype: "FP32", shape: [rows.length, rows[0].length] }],
    raw_input_contents: [float32Bytes(rows)],
  };
}

// The first output of a ModelInferResponse, decoded from raw_output_contents.
function firstOutput(response) {
  const output = response.outputs[0];
  return {
    name: output.name,
    datatype: output.datatype,
    shape: output.shape.map(Number),
    data: reshape(float32Values(response.raw_output_contents[0]), output.shape.map(Number)),
  };
}

async function main() {
  const definition = protoLoader.loadSync(FILES, {
    includeDirs: [protosDir],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const loaded = grpc.loadPackageDefinition(definition);
  // Message types and enums carry a `format`; a service is an object of method definitions.
  const services = Object.keys(definition).filter((name) => {
    const value = definition[name];
    return !("format" in value) && Object.values(value).every((m) => typeof m.path === "string");
  });
  emit("load", { files: FILES, services });
  const options = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
  };
  const credentials = grpc.credentials.createInsecure();
  const inference = new loaded.inference.GRPCInferenceService(gateway, credentials, options);
  const data = new loaded.meshserve.data.v1.DataService(gateway, credentials, options);

  const live = await unary(inference, "ServerLive", {});
  emit("server_live", { live: live.reply.live });

  const metadata = (await unary(inference, "ModelMetadata", { name: plan.model })).reply;
  const tensors = (list) =>
    list.map((t) => ({ name: t.name, datatype: t.datatype, shape: t.shape.map(Number) }));
  emit("model_metadata", {
    name: metadata.name,
    versions: metadata.versions,
    inputs: tensors(metadata.inputs),
    outputs: tensors(metadata.outputs),
  });

  const inferred = (await unary(inference, "ModelInfer", inferRequest(metadata, plan.rows))).reply;
  emit("model_infer", { model_version: inferred.model_version, output: firstOutput(inferred) });

  // Server streaming: one epoch of the dataset, every example once.
  await new Promise((resolve, reject) => {
    const batches = [];
    const call = data.StreamBatches(
      { dataset: plan.dataset, split: "SPLIT_ALL", batch_size: 128 },
      new grpc.Metadata(),
      { deadline: deadline(30000) },
    );
    call.on("data", (batch) => batches.push(batch));
    call.on("error", reject);
    call.on("end", () => {
      const first = batches[0].tensors[0];
      emit("stream_batches", {
        batches: batches.length,
        indexes: batches.map((b) => b.index),
        examples: batches.reduce((sum, b) => sum + b.size, 0),
        first_tensor: { name: first.name, shape: first.shape, bytes: first.raw_data.length },
      });
      resolve();
    });
  });

  // Client streaming: a header, then record chunks.
  await new Promise((resolve, reject) => {
    const call = data.CreateDataset(new grpc.Metadata(), { deadline: deadline(30000) }, (err, dataset) => {
      if (err) return reject(err);
      emit("create_dataset", { name: dataset.name, version: dataset.version, examples: dataset.num_examples });
      resolve();
    });
    call.write({
      header: {
        name: plan.upload,
        schema: {
          features: [{ name: "x", data_type: "DATA_TYPE_FP32", shape: [2] }],
          labels: [{ name: "y", data_type: "DATA_TYPE_INT64", shape: [] }],
          task: "TASK_CLASSIFICATION",
          num_classes: 2,
        },
      },
    });
    for (let chunk = 0; chunk < 3; chunk++) {
      const xs = [];
      const ys = Buffer.alloc(4 * 8);
      for (let i = 0; i < 4; i++) {
        xs.push([chunk + i / 4, -chunk - i / 4]);
        ys.writeBigInt64LE(BigInt((chunk + i) % 2), i * 8);
      }
      call.write({
        chunk: {
          tensors: [
            { name: "x", data_type: "DATA_TYPE_FP32", shape: [4, 2], raw_data: float32Bytes(xs) },
            { name: "y", data_type: "DATA_TYPE_INT64", shape: [4], raw_data: ys },
          ],
        },
      });
    }
    call.end();
  });

  // Bidirectional streaming: one request per row, each answered under its own id.
  await new Promise((resolve, reject) => {
    const outputs = {};
    const errors = [];
    const call = inference.ModelStreamInfer(new grpc.Metadata(), { deadline: deadline(30000) });
    call.on("data", (reply) => {
      if (reply.error_message) errors.push(reply.error_message);
      else outputs[reply.infer_response.id] = firstOutput(reply.infer_response).data[0];
    });
    call.on("error", reject);
    call.on("end", () => {
      emit("model_stream_infer", { outputs, errors });
      resolve();
    });
    plan.rows.forEach((row, i) => call.write(inferRequest(metadata, [row], `node-${i}`)));
    call.end();
  });

  // A deadline that expires mid-call: a stream that got its answer, then stays open. The
  // answer must come before the deadline: 4 s, not a warm call's milliseconds, on a loaded
  // machine where the gateway, sidecar and worker share two cores with the test run.
  await new Promise((resolve) => {
    const report = settle(resolve, "deadline");
    const started = Date.now();
    let answered = 0;
    const call = inference.ModelStreamInfer(new grpc.Metadata(), { deadline: deadline(4000) });
    call.on("data", () => {
      answered += 1;
    });
    call.on("error", (err) => {
      report({ code: codeName(err.code), answered, elapsed_ms: Date.now() - started });
    });
    call.on("end", () => report({ code: "OK", answered, elapsed_ms: Date.now() - started }));
    call.write(inferRequest(metadata, [plan.rows[0]], "held"));
  });

  // Cancelled by the client after its first message.
  await new Promise((resolve) => {
    const report = settle(resolve, "cancelled");
    let received = 0;
    const call = data.StreamBatches(
      { dataset: plan.dataset, split: "SPLIT_ALL", batch_size: 1 },
      new grpc.Metadata(),
      { deadline: deadline(30000) },
    );
    call.on("data", () => {
      received += 1;
      if (received === 1) call.cancel();
    });
    call.on("error", (err) => report({ code: codeName(err.code), received }));
    call.on("end", () => report({ code: "OK", received }));
  });

  // The gateway's x-request-id: the client's own, or the one it made.
  const mine = new grpc.Metadata();
  mine.set("x-request-id", `node-${process.pid}`);
  const kept = await unary(inference, "ServerLive", {}, mine);
  const made = await unary(inference, "ServerLive", {});
  let failed = null;
  try {
    await unary(inference, "ModelMetadata", { name: "no-such-model" }, mine);
  } catch (err) {
    failed = { code: codeName(err.code), id: err.metadata.get("x-request-id") };
  }
  emit("request_id", {
    sent: `node-${process.pid}`,
    returned: kept.headers.get("x-request-id"),
    generated: made.headers.get("x-request-id"),
    failed,
  });

  inference.close();
  data.close();
}

main().catch((err) => {
  emit("fatal", { code: err.code === undefined ? null : codeName(err.code), message: String(err.stack || err) });
  process.exitCode = 1;
});
