// Unit tests of the front end's pure logic (src/format.ts); run by `npm test` and from pytest.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  transform: {
    '^.+\\.ts$': [
      'ts-jest',
      { tsconfig: { module: 'commonjs', types: ['jest'], rootDir: '.', noUnusedLocals: true, strict: true } }
    ]
  }
};
