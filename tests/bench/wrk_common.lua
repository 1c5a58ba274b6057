-- Shared by plain.lua and stream.lua: one POST /v1/chat/completions with "store": true,
-- a bearer token (the proxy needs one to own a stored completion), an optional request
-- cap and a machine-readable summary.
--
-- BENCH_STORE=0 sends "store": false instead: the proxy forwards without capturing.
-- BENCH_HEADERS="Name: value" lines are added to every request (a peer gateway's routing).
--
-- BENCH_MAX_REQUESTS=N stops after N responses (per wrk thread; run.py uses -t1): the
-- thread stops and prints "BENCH_STOP"; wrk's main thread still sleeps out -d, so run.py
-- sends it SIGINT on that line, which ends the run and prints the summary at once.
-- done() prints one line, "BENCH_JSON {...}", that run.py parses; latencies are in µs.

local M = {}

function M.setup(stream)
  local store = os.getenv("BENCH_STORE") == "0" and "false" or "true"
  local body = '{"model":"gpt-4o-mini","store":' .. store .. ','
  if stream then
    body = body .. '"stream":true,'
  end
  body = body
    .. '"metadata":{"bench":"wrk","user":"user-42"},"temperature":0.2,"messages":['
    .. '{"role":"system","content":"You are a concise assistant for a benchmark run."},'
    .. '{"role":"user","content":"Summarise in two sentences why a logging proxy must '
    .. 'forward bytes unchanged and commit a stored completion before its final byte."}]}'
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer sk-bench-0123456789abcdef"
  for name, value in (os.getenv("BENCH_HEADERS") or ""):gmatch("([^:\n]+):%s*([^\n]*)") do
    wrk.headers[name] = value
  end

  local max = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "")
  if max then
    local count = 0
    -- Defined only when capped: a response() callback makes wrk hand every body to Lua.
    response = function(status, headers, body)
      count = count + 1
      if count == max then
        wrk.thread:stop()
        io.write("BENCH_STOP\n")
        io.flush()
      end
    end
  end

  done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%.0f,"bytes":%.0f,'
        .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
        .. '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,'
        .. '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
  end
end

return M
