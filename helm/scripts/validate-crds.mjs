// Validates the custom resources of rendered manifests (stdin, multi-document YAML) against
// the prometheus-operator models (npm @kubernetes-models/prometheus-operator, installed under
// $SWITCHYARD_NPM/node_modules). Exits 1 on the first invalid one.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const root = join(process.env.SWITCHYARD_NPM, "node_modules");
const yaml = createRequire(join(root, "x.js"))("js-yaml");
const model = (p) => import(pathToFileURL(join(root, "@kubernetes-models/prometheus-operator", p)).href);
const { ServiceMonitor } = await model("monitoring.coreos.com/v1/ServiceMonitor.js");
const kinds = { "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor };
let checked = 0;
for (const d of yaml.loadAll(readFileSync(0, "utf8")).filter(Boolean)) {
  const Model = kinds[`${d.apiVersion}/${d.kind}`];
  if (!Model) continue;
  try {
    new Model(d).validate();
  } catch (e) {
    console.error(`invalid ${d.kind}/${d.metadata?.name}: ${e.message}`);
    process.exit(1);
  }
  console.log(`valid ${d.kind}/${d.metadata.name}`);
  checked++;
}
console.log(`${checked} custom resource(s) validated`);
