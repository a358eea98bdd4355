// Write a DICOM-SEG with dcmjs' legacy Cornerstone adapter, the writer of OHIF v2 and
// other cornerstoneTools-4 viewers: dcmjs.adapters.Cornerstone.Segmentation
// .generateSegmentation(images, labelmap3D, options).
//
// With its default options (rleEncode: true) it writes a FRACTIONAL SEG, RLE Lossless,
// Maximum Fractional Value 255 and pixel values 0/1; rle_encode=false gives BINARY,
// bit-packed, Explicit VR Little Endian. Segment metadata is what cornerstoneTools 4
// kept per segment: the codes it was given (those of a SEG it loaded, or SRT "Tissue"
// for a segment drawn from scratch), the label, MANUAL and a CIELab colour.
//
//   node write_dcmjs.mjs JOB.json        (job format: job.mjs)
import dcmjs from "dcmjs";

import { cielab, codeItem, loadSlices, readJob, segmentsOn, writeOutput } from "./job.mjs";

const job = readJob();
const slices = loadSlices(job);

// cornerstone-core images: the legacy adapter re-reads each source file from the bytes
// the image loader kept (image.data.byteArray.buffer).
const images = slices.map((slice, i) => ({
  imageId: `dicomfile:${i}`,
  data: { byteArray: { buffer: slice.buffer } },
}));
const metadata = [];
for (const segment of job.segments) {
  metadata[segment.index] = {
    SegmentedPropertyCategoryCodeSequence: codeItem(segment.category),
    SegmentNumber: String(segment.index),
    SegmentLabel: segment.label,
    SegmentAlgorithmType: "MANUAL",
    RecommendedDisplayCIELabValue: cielab(segment.color),
    SegmentedPropertyTypeCodeSequence: codeItem(segment.type),
  };
}
const labelmap3D = {
  labelmaps2D: slices.map((slice) => ({
    pixelData: slice.pixelData,
    segmentsOnLabelmap: segmentsOn(slice.pixelData),
  })),
  metadata,
};
const options = { rleEncode: job.rle_encode };
if (job.series_instance_uid) {
  options.SeriesInstanceUID = job.series_instance_uid;
}
const blob = dcmjs.adapters.Cornerstone.Segmentation.generateSegmentation(
  images, labelmap3D, options,
);
writeOutput(job, await blob.arrayBuffer());
