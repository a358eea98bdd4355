// Node ESM resolve hook for packages published for bundlers, as @cornerstonejs/core and
// vtk.js are: their ES modules import directories ("./enums") and extensionless files
// ("gl-matrix/vec3", "vtk.js/.../VolumeMapper"), which webpack resolves and Node does
// not. On such a failure try, in order, FILE.js, the directory's package.json
// "module"/"main", and DIR/index.js - what a bundler would pick. Nothing else changes,
// so the code that runs is the published code. Registered by write_cornerstone.mjs.
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const RETRIED = new Set(["ERR_UNSUPPORTED_DIR_IMPORT", "ERR_MODULE_NOT_FOUND"]);

function bundlerCandidates(file) {
  const candidates = [`${file}.js`];
  const manifest = path.join(file, "package.json");
  if (existsSync(manifest)) {
    const entry = JSON.parse(readFileSync(manifest, "utf8"));
    if (entry.module || entry.main) {
      candidates.push(path.resolve(file, entry.module || entry.main));
    }
  }
  candidates.push(path.join(file, "index.js"));
  return candidates.filter((candidate) => existsSync(candidate));
}

export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (error) {
    if (!RETRIED.has(error.code) || !error.url) {
      throw error;
    }
    const [found] = bundlerCandidates(fileURLToPath(error.url));
    if (!found) {
      throw error;
    }
    return nextResolve(pathToFileURL(found).href, context);
  }
}
