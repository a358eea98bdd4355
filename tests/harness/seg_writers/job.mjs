// The job file shared by write_dcmjs.mjs and write_cornerstone.mjs, written by
// tests/harness/writers.py:
//
//   {
//     "sources": ["/abs/IM0001.dcm", ...],          single-frame images, label map order
//     "labelmap": {"path": "/abs/labels.u8", "shape": [frames, rows, cols]},
//                                                   raw uint8, C order; a pixel holds the
//                                                   viewer's segment index (0 = background)
//     "segments": [{"index": 1, "label": "Soleus", "color": [r, g, b],
//                   "category": {"value": ..., "scheme": ..., "meaning": ...},
//                   "type": {...}}],
//     "output": "/abs/out.dcm",
//     "series_instance_uid": null | "1.2...",       save into an existing series
//     "rle_encode": true                            write_dcmjs only
//   }
import { readFileSync, writeFileSync } from "node:fs";

import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

/** Read the job file named on the command line; exit with a usage line otherwise. */
export function readJob() {
  if (process.argv.length !== 3) {
    console.error(`usage: node ${process.argv[1]} JOB.json`);
    process.exit(2);
  }
  return JSON.parse(readFileSync(process.argv[2], "utf8"));
}

/**
 * The source slices as a viewer holds them: each with its file bytes, its dcmjs
 * naturalized dataset and its 2D label map, sorted the way a Cornerstone stack is.
 *
 * Both writers hand their images to dcmjs' ImageNormalizer, which re-sorts them by
 * descending distance along the slice normal (row x column cosines) from the first
 * image, while taking label map i from the caller's position i. A viewer's stack is
 * already in that order (Cornerstone's sortImageIdsAndGetSpacing sorts the same way),
 * so the label maps stay with their slices; this reproduces that order.
 */
export function loadSlices(job) {
  const [frames, rows, columns] = job.labelmap.shape;
  if (frames !== job.sources.length) {
    throw new Error(`label map has ${frames} frames for ${job.sources.length} sources`);
  }
  const labels = new Uint8Array(readFileSync(job.labelmap.path));
  const frameSize = rows * columns;
  if (labels.length !== frames * frameSize) {
    throw new Error(`label map file holds ${labels.length} bytes, shape needs ${frames * frameSize}`);
  }
  const slices = job.sources.map((path, i) => {
    const bytes = readFileSync(path);
    // A fresh ArrayBuffer: Node pools small Buffers, and dcmjs reads `.buffer` whole.
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    const message = DicomMessage.readFile(buffer);
    const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
    dataset._meta = DicomMetaDictionary.namifyDataset(message.meta);
    const pixelData = labels.slice(i * frameSize, (i + 1) * frameSize);
    return { path, buffer, dataset, pixelData };
  });
  const [first] = slices;
  const orientation = first.dataset.ImageOrientationPatient.map(Number);
  const normal = cross(orientation.slice(0, 3), orientation.slice(3, 6));
  const origin = first.dataset.ImagePositionPatient.map(Number);
  const distance = (slice) => dot(
    slice.dataset.ImagePositionPatient.map((v, k) => Number(v) - origin[k]), normal,
  );
  return slices.sort((a, b) => distance(b) - distance(a));
}

/** The segment indices (non-zero values) present in one 2D label map. */
export function segmentsOn(pixelData) {
  return [...new Set(pixelData)].filter((value) => value !== 0).sort((a, b) => a - b);
}

/** DICOM CIELab (0..65535) of an sRGB colour given as 0..255 integers. */
export function cielab(color) {
  return dcmjs.data.Colors.rgb2DICOMLAB(color.map((v) => v / 255)).map((v) => Math.round(v));
}

/** A dcmjs code sequence item from the job's {value, scheme, meaning}. */
export function codeItem(code) {
  return {
    CodeValue: code.value,
    CodingSchemeDesignator: code.scheme,
    CodeMeaning: code.meaning,
  };
}

/** Write Part 10 bytes. */
export function writeOutput(job, bytes) {
  writeFileSync(job.output, Buffer.from(bytes));
}

function cross(a, b) {
  return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
}

function dot(a, b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}
