export const bunTransport: import("../transport.ts").TransportFactory = {
  spawn() {
    throw new Error("Bun adapter not written yet");
  },
};
