// One graphile-worker process for drover's queue benchmark: runs no-op
// `noop` jobs with CONCURRENCY workers and a local queue of LOCAL_QUEUE
// jobs until it gets SIGTERM, then stops cleanly. Started several times at
// once by api/benches/queue.rs against DATABASE_URL; the bench watches the
// job table and sends SIGTERM when it is empty (so that, as for drover,
// one observer asks four times a second, not every worker twenty times).
const { run } = require("graphile-worker");

async function main() {
  const connectionString = process.env.DATABASE_URL;
  const concurrency = Number(process.env.CONCURRENCY || 24);
  const size = Number(process.env.LOCAL_QUEUE || 100);
  const runner = await run({
    connectionString,
    concurrency,
    // One connection per concurrent job, as its documentation advises.
    maxPoolSize: concurrency,
    noHandleSignals: true,
    pollInterval: 1000,
    logger: undefined,
    taskList: { noop: async () => {} },
    preset: { worker: { localQueue: { size } } },
  });
  await new Promise((resolve) => process.once("SIGTERM", resolve));
  await runner.stop();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
