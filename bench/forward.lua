-- wrk script for the HTTP forward proxy measurement (bench.py sets the variables).
-- BENCH_TARGET: the absolute-form target ("http://127.0.0.1:PORT/small"), sent to a
-- proxy as `GET http://... HTTP/1.1`; empty when wrk talks to nginx directly.
-- BENCH_HOST: the Host header to send with it.
-- done() prints one JSON line that bench.py reads.

local target = os.getenv("BENCH_TARGET")
if target and target ~= "" then
  wrk.path = target
  wrk.headers["Host"] = os.getenv("BENCH_HOST")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
