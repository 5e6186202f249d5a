// Validate one .glb/.gltf file with the Khronos glTF validator; print its JSON report on stdout.
// Usage: node tools/gltf-validator/validate.js FILE   (exit 0 once validated, 2 on a failure to run)
"use strict";
const fs = require("fs");
const path = require("path");
const validator = require("gltf-validator");

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate.js FILE");
  process.exit(2);
}
const bytes = new Uint8Array(fs.readFileSync(file));
validator
  .validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues: 100,
    externalResourceFunction: (uri) =>
      new Promise((resolve, reject) => {
        fs.readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)), (err, data) =>
          err ? reject(err.toString()) : resolve(new Uint8Array(data)));
      }),
  })
  .then((report) => process.stdout.write(JSON.stringify(report) + "\n"))
  .catch((error) => {
    console.error("validation failed to run: " + error);
    process.exit(2);
  });
