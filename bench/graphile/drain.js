// One graphile-worker process for drover's queue benchmark: runs no-op
// `noop` jobs with CONCURRENCY workers and a local queue of LOCAL_QUEUE
// jobs until the job table is empty, then stops. Started several times at
// once by api/benches/queue.rs against DATABASE_URL.
const { run } = require("graphile-worker");
const { Pool } = require("pg");

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
  const pool = new Pool({ connectionString, max: 1 });
  for (;;) {
    const { rows } = await pool.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs");
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  await runner.stop();
  await pool.end();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
