"""A constrained stream's throughput against an unconstrained one, over the OpenAI-style API
with the official client: 4 closed-loop clients, 3 requests each per arm, the arms alternating,
temperature 1; the constrained arm asks for a JSON schema (a string of up to 400 characters
and an integer), the other generates freely (ignore_eos) -- tokens per second of each.

    python3 scripts/bench-constrained.py HTTP_BASE_URL RUNS
(against e.g. `switchyard up --model DIR --workers 2 --http-addr 127.0.0.1:18080`)
"""
import json, sys, time, threading
import openai
base, arms_runs = sys.argv[1], int(sys.argv[2])
client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
model = client.models.list().data[0].id
schema = {"type": "json_schema", "json_schema": {"name": "T", "schema": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 400},
    "n": {"type": "integer"}}, "required": ["name", "n"], "additionalProperties": False}}}
def arm(constrained, clients=4, reqs=3, max_tokens=48):
    toks = [0] * clients
    def worker(i):
        for r in range(reqs):
            kw = {"extra_body": {"response_format": schema}} if constrained else {"extra_body": {"ignore_eos": True}}
            out = client.completions.create(model=model, prompt=f"Record {i} {r}:", max_tokens=max_tokens,
                                            temperature=1.0, seed=i * 100 + r, **kw)
            toks[i] += out.usage.completion_tokens
    t0 = time.time()
    th = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    [t.start() for t in th]; [t.join() for t in th]
    return sum(toks) / (time.time() - t0)
res = []
for run in range(arms_runs):
    u = arm(False); c = arm(True)
    res.append((u, c, c / u))
    print(f"run {run}: unconstrained {u:.1f} tok/s, constrained {c:.1f} tok/s, ratio {c/u:.2f}", flush=True)
