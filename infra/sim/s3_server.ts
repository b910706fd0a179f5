/**
 * The simulation's object store: s3rver (an S3-compatible server; MinIO does
 * not install here) on the object-store node's address, with the seeds'
 * bucket. Runs until killed (by sim-down or sim-kill).
 *
 * `deno run ... s3_server.ts '{"address","port","directory","bucket"}'`
 *
 * @module
 */

if (import.meta.main) {
  const { address, port, directory, bucket } = JSON.parse(Deno.args[0]);
  const { default: S3rver } = await import("npm:s3rver@3.7.1");
  await Deno.mkdir(directory, { recursive: true });
  const server = new S3rver({
    address,
    port,
    directory,
    silent: true,
    configureBuckets: [{ name: bucket, configs: [] }],
  });
  await server.run();
  console.error(`s3rver on http://${address}:${port}, bucket ${bucket}`);
}
