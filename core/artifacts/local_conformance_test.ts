import { artifactStoreConformance } from "./conformance.ts";
import { openLocalArtifactStore } from "./local.ts";
import { digestHex } from "./store.ts";

artifactStoreConformance("local", {
  async open({ clock }) {
    const root = await Deno.makeTempDir({ prefix: "runnel-artifacts-" });
    const blobPath = (digest: string) => {
      const hex = digestHex(digest);
      return `${root}/blobs/sha256/${hex.slice(0, 2)}/${hex.slice(2)}`;
    };
    return {
      store: openLocalArtifactStore(root, { clock }),
      async blobDigests() {
        const digests: string[] = [];
        const shards = `${root}/blobs/sha256`;
        try {
          for await (const shard of Deno.readDir(shards)) {
            for await (const blob of Deno.readDir(`${shards}/${shard.name}`)) {
              digests.push(`sha256:${shard.name}${blob.name}`);
            }
          }
        } catch (error) {
          if (!(error instanceof Deno.errors.NotFound)) throw error;
        }
        return digests.sort();
      },
      async overwriteBlob(digest, bytes) {
        // Blobs are read-only; a stray writer with the rights can still change them.
        await Deno.chmod(blobPath(digest), 0o644);
        await Deno.writeFile(blobPath(digest), bytes);
      },
      async deleteBlob(digest) {
        await Deno.remove(blobPath(digest));
      },
      async [Symbol.asyncDispose]() {
        await Deno.remove(root, { recursive: true });
      },
    };
  },
});
