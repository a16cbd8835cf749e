// What the evaluation report's viewer uses of NiiVue (bundled as the global `niivue`).
export { Niivue, NVImage } from "@niivue/niivue";
