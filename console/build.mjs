// Bundles the console (src/main.tsx, with preact and @cruzflow/client) into
// one file the server serves: server/cruzflow/server/console/console.js.
// The output is checked in, so running the server needs no Node; `make
// console-check` rebuilds it into a temporary folder and fails when it differs.
//
//   node build.mjs            write the bundle
//   node build.mjs --out DIR  write it into DIR instead (what the check does)

import { build } from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const flag = process.argv.indexOf("--out");
const outdir = flag > 0 ? process.argv[flag + 1] : path.join(here, "..", "server", "cruzflow", "server", "console");

await build({
  entryPoints: [path.join(here, "src", "main.tsx")],
  outfile: path.join(outdir, "console.js"),
  bundle: true,
  format: "esm",
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  platform: "browser",
  minify: true,
  legalComments: "eof",
  jsx: "automatic",
  jsxImportSource: "preact",
  // The bundle must not depend on where it was built.
  absWorkingDir: here,
  sourcemap: false,
  logLevel: "warning",
});
