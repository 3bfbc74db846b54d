'use strict';
// Preloaded into the jsii kernel's node process (NODE_OPTIONS=--require <this file>).
//
// A prebuilt cdktf provider's lib/index.js is a list of
//     exports.vpc = require("./vpc");
// lines, one per resource (2,212 for aws, 1,527 for azurerm), so the kernel's
// require() of the package compiles every resource's JavaScript (219 MB for aws)
// although a stack uses a handful. This hook rewrites those lines, and only
// those, into getters that require the submodule the first time the kernel
// looks it up (the kernel resolves a type by walking exports.<submodule>.<Type>).
// Anything that does not match the exact pattern is left as it was.
const Module = require('module');

const INDEX = /[\\/]@cdktf[\\/]provider-[^\\/]+[\\/]lib[\\/]index\.js$/;
const LINE = /^exports\.([A-Za-z_$][A-Za-z0-9_$]*) = require\("(\.\/[^"\\]+)"\);$/gm;
const HELPER = `
function __jsiiLazyExport(name, rel) {
  Object.defineProperty(exports, name, {
    configurable: true,
    enumerable: true,
    get() {
      const value = require(rel);
      Object.defineProperty(exports, name, { value, configurable: true, enumerable: true, writable: true });
      return value;
    },
  });
}
`;

const originalCompile = Module.prototype._compile;
Module.prototype._compile = function compileWithLazyExports(content, filename, ...rest) {
  if (typeof content === 'string' && INDEX.test(filename)) {
    let count = 0;
    const lazy = content.replace(LINE, (_line, name, rel) => {
      count += 1;
      return `__jsiiLazyExport(${JSON.stringify(name)}, ${JSON.stringify(rel)});`;
    });
    if (count > 0) {
      if (process.env.JSII_LAZY_EXPORTS_DEBUG) {
        process.stderr.write(`[jsii-lazy-exports] ${filename}: ${count} submodules made lazy\n`);
      }
      // The helper is a function declaration, so appending it keeps the
      // "use strict" directive first and is hoisted above its first use.
      content = lazy + HELPER;
    }
  }
  return originalCompile.call(this, content, filename, ...rest);
};
