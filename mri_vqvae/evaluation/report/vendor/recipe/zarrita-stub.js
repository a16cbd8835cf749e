// Stands in for zarrita: NiiVue reads OME-Zarr through it (remote stores over the network and
// 1.3 MB of compression codecs as WebAssembly); the report embeds NIfTI only and never fetches.
const missing = () => {
  throw new Error("OME-Zarr is not part of this NiiVue bundle");
};
export const slice = missing;
export const root = missing;
export const open = missing;
export const get = missing;
export class FetchStore {
  constructor() {
    missing();
  }
}
