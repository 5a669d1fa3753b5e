// The error classes (src/errors.ts): messages that say what to do.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RequestError, UnsupportedMethodError } from "../mod.ts";

test("request errors from setup mistakes say what to do about them", () => {
  const tls = new RequestError("OpenImage", "pinging: x509: certificate signed by unknown authority");
  assert.match(tls.message, /x509: certificate signed by unknown authority \(set "certificateDirectory"/);
  assert.equal(tls.serverMessage, "pinging: x509: certificate signed by unknown authority");
  assert.match(
    new RequestError("OpenImage", "http: server gave HTTP response to HTTPS client").message,
    /plain HTTP/,
  );
  assert.match(new RequestError("OpenImage", "authentication required").message, /"authfile" or "authData"/);
  assert.doesNotMatch(new RequestError("GetBlob", "no image 5").message, /\(/);
  assert.match(
    new UnsupportedMethodError("GetRawBlob", "0.2.8", "0.2.3").message,
    /needs proxy protocol version 0\.2\.8 or newer \(skopeo 1\.19 or newer\), but this proxy speaks 0\.2\.3/,
  );
});
