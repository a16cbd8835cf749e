// The interactive viewers of report.html (see viewer.py): each <figure class="viewer"> holds
// canvases whose data-layers attribute lists base64 gzipped NIfTI volumes, the first the
// background, the rest colour overlays (a volume the page holds twice is embedded once: a later
// layer names it by key). Each canvas becomes a NiiVue instance showing three
// planes with a crosshair; the crosshairs of one figure move together. A figure is revealed
// only once all its canvases have drawn (data-viewer="ready"); on any failure (no WebGL2) it
// stays hidden (data-viewer="failed: ...") and the page is the static one.
(function () {
  "use strict";
  var ROW = 3; // MULTIPLANAR_TYPE.ROW: the three planes side by side
  var NEVER = 0; // SHOW_RENDER.NEVER: no 3D rendering tile

  var volumes = {}; // key -> base64, from every layer that embeds its volume
  document.querySelectorAll("figure.viewer canvas[data-layers]").forEach(function (canvas) {
    JSON.parse(canvas.getAttribute("data-layers")).forEach(function (l) {
      if (l.base64) volumes[l.key] = l.base64;
    });
  });

  // "voxel i j k: input 0.512, reconstruction 0.498, error 0.014" over every panel of a figure
  // (their volumes share one grid); NiiVue reports the voxel of the panel the reader moved.
  function readout(viewers, vox) {
    var values = [];
    viewers.forEach(function (nv) {
      nv.volumes.forEach(function (v) {
        var value = v.getValue(vox[0], vox[1], vox[2]);
        values.push(v.name.replace(/\.nii\.gz$/, "") + " " + Number(value).toPrecision(3));
      });
    });
    return "voxel " + Array.from(vox).join(" ") + ": " + values.join(", ");
  }

  async function panel(canvas) {
    var layers = JSON.parse(canvas.getAttribute("data-layers"));
    var nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1],
      crosshairColor: [1, 0.25, 0.25, 0.75],
      crosshairWidth: 0.5, // in voxels: thin on coarse grids too
      multiplanarLayout: ROW,
      multiplanarShowRender: NEVER,
      isColorbar: layers.some(function (l) { return l.colorbar; }),
      dragAndDropEnabled: false,
      logLevel: "error",
    });
    await nv.attachToCanvas(canvas);
    for (var i = 0; i < layers.length; i++) {
      var l = layers[i];
      nv.addVolume(await niivue.NVImage.loadFromBase64({
        base64: volumes[l.key], name: l.name, colormap: l.colormap, opacity: l.opacity,
        cal_min: l.cal_min, cal_max: l.cal_max, colorbarVisible: l.colorbar,
      }));
    }
    nv.setSliceType(nv.sliceTypeMultiplanar);
    return nv;
  }

  async function show(figure) {
    var where = figure.querySelector(".viewer-where");
    try {
      figure.hidden = false; // laid out before NiiVue sizes its canvases
      var canvases = figure.querySelectorAll("canvas[data-layers]");
      var viewers = [];
      for (var i = 0; i < canvases.length; i++) viewers.push(await panel(canvases[i]));
      viewers.forEach(function (nv) {
        var others = viewers.filter(function (o) { return o !== nv; });
        if (others.length) nv.broadcastTo(others, { "2d": true, "3d": true });
        nv.onLocationChange = function (data) { where.textContent = readout(viewers, data.vox); };
      });
      figure.setAttribute("data-viewer", "ready");
    } catch (err) {
      figure.hidden = true;
      figure.setAttribute("data-viewer", "failed: " + err);
    }
  }

  if (window.niivue) document.querySelectorAll("figure.viewer").forEach(show);
})();
