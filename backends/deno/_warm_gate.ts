/**
 * The first import of a warm step's module file: evaluated after the step's
 * whole graph has loaded and before any of its modules evaluates, it drops
 * the read grants the process held only to load that graph (see
 * `_warm.ts`). Imports nothing the harness has not loaded already.
 *
 * @module
 */

import { dropLoadGrants } from "./_harness.ts";

dropLoadGrants();
