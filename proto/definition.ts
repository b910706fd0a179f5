/**
 * The protocol's definition, `proto/runnel.proto`, and how its messages are
 * decoded: what both grpc-js (at run time) and `proto/_gen.ts` (writing the
 * message interfaces) read.
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import type * as protoLoader from "npm:@grpc/proto-loader@0.8.1";

/** The protocol definition, on the local file system beside this module. */
export const PROTO_FILE: string = fileURLToPath(new URL("./runnel.proto", import.meta.url));

/**
 * How messages are decoded: camelCase fields, int64 as number, enums by
 * name, every field present with its default, and a virtual field naming
 * the member of each oneof. `proto/_gen.ts` writes the message interfaces
 * for exactly these options.
 */
export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};
