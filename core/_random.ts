/**
 * Seeded randomness for the simulation and fuzz tests: the seed comes from
 * `RUNNEL_SEED` when set, so a failure printed with its seed replays.
 *
 * @module
 */

/** The seed of this test run: `RUNNEL_SEED`, else a fresh random one. */
export function testSeed(): number {
  return Number(Deno.env.get("RUNNEL_SEED") ?? Math.floor(Math.random() * 2 ** 31));
}

/** mulberry32: a small, fast PRNG, good enough for test input; values in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
