// Type-checks every ```ts block of README.md against the built package
// (dist/), as a module of its own, so the README's examples cannot go stale.
// Run by `make ts-lint` from the repository's root, after the client is built.
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const readme = readFileSync(join(root, "README.md"), "utf8");
const blocks = [...readme.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
if (blocks.length === 0) {
  console.error("README.md has no ```ts block to check");
  process.exit(1);
}
// Inside the package's folder, so "@cruzflow/client" resolves to this
// package itself (its "exports": dist/), as it does for a user.
const out = join(root, "build", "readme");
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
blocks.forEach((code, i) => writeFileSync(join(out, `block-${i + 1}.ts`), code));
writeFileSync(
  join(out, "tsconfig.json"),
  JSON.stringify({
    extends: "../../tsconfig.json",
    // Examples may show a value without using it.
    compilerOptions: { rootDir: ".", noEmit: true, noUnusedLocals: false },
    include: ["*.ts"],
  }),
);
const tsc = join(root, "node_modules", ".bin", "tsc");
const run = spawnSync(tsc, ["-p", join(out, "tsconfig.json")], { encoding: "utf8" });
if (run.status !== 0) {
  console.error(`README.md's examples do not type-check (build/readme/block-N.ts is the N-th):`);
  console.error(run.stdout + run.stderr);
  process.exit(1);
}
console.log(`README.md: ${blocks.length} TypeScript examples type-check`);
