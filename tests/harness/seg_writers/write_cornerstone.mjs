// Write a DICOM-SEG the way OHIF v3 saves one: its cornerstone-dicom-seg
// "generateSegmentation" command calls @cornerstonejs/adapters'
// adaptersSEG.Cornerstone3D.Segmentation.generateSegmentation(referencedImages,
// labelmap3D, metaData, options), and the data source stores the dataset as Explicit VR
// Little Endian.
//
// What OHIF contributes is reproduced here, nothing more:
// - segment metadata: the label and colour only; category and type are always SRT
//   "T-D0050" Tissue, Segment Algorithm Type MANUAL, algorithm name "OHIF Brush"
//   (the job's codes are not used - OHIF does not keep them);
// - the metadata provider: OHIF's MetadataProvider answers Cornerstone's module queries
//   (generalSeriesModule, imagePlaneModule, ...) from the naturalized instances; the
//   adapters' own provider (registered on import) turns those into the study, series
//   and image data the writer copies.
//
//   node write_cornerstone.mjs JOB.json        (job format: job.mjs)
import { register } from "node:module";

import dcmjs from "dcmjs";

import { cielab, loadSlices, readJob, segmentsOn, writeOutput } from "./job.mjs";

register("./bundler_resolve.mjs", import.meta.url);
const { metaData } = await import("@cornerstonejs/core");
const { adaptersSEG } = await import("@cornerstonejs/adapters");

const TISSUE = { CodeValue: "T-D0050", CodingSchemeDesignator: "SRT", CodeMeaning: "Tissue" };

const job = readJob();
const slices = loadSlices(job);
const instances = new Map(slices.map((slice, i) => [`dafne:${i}`, slice.dataset]));
// OHIF registers its MetadataProvider with priority 9999.
metaData.addProvider((type, imageId) => {
  const instance = instances.get(imageId);
  return instance && ohifModule(type, instance);
}, 9999);

const referencedImages = slices.map((slice, i) => ({
  imageId: `dafne:${i}`,
  voxelManager: { getScalarData: () => scalarData(slice.dataset) },
}));
const labelmaps2D = slices.map((slice) => ({
  segmentsOnLabelmap: segmentsOn(slice.pixelData),
  pixelData: slice.pixelData,
  rows: slice.dataset.Rows,
  columns: slice.dataset.Columns,
}));
const labelmap3D = {
  segmentsOnLabelmap: [...new Set(labelmaps2D.flatMap((l) => l.segmentsOnLabelmap))],
  metadata: [],
  labelmaps2D,
};
for (const segment of job.segments) {
  labelmap3D.metadata[segment.index] = {
    SegmentNumber: String(segment.index),
    SegmentLabel: segment.label,
    SegmentAlgorithmType: "MANUAL",
    SegmentAlgorithmName: "OHIF Brush",
    RecommendedDisplayCIELabValue: cielab(segment.color),
    SegmentedPropertyCategoryCodeSequence: { ...TISSUE },
    SegmentedPropertyTypeCodeSequence: { ...TISSUE },
  };
}
const options = { SeriesDescription: "Segmentation" };
if (job.series_instance_uid) {
  options.SeriesInstanceUID = job.series_instance_uid;
}
const generated = adaptersSEG.Cornerstone3D.Segmentation.generateSegmentation(
  referencedImages, labelmap3D, metaData, options,
);
writeOutput(job, dcmjs.data.datasetToBuffer(generated.dataset));

/** The pixels Cornerstone's voxel manager holds for a single-frame source image. */
function scalarData(dataset) {
  const buffer = Array.isArray(dataset.PixelData) ? dataset.PixelData[0] : dataset.PixelData;
  return dataset.PixelRepresentation === 1 ? new Int16Array(buffer) : new Uint16Array(buffer);
}

/** OHIF MetadataProvider's answer to a Cornerstone module query (the modules asked for). */
function ohifModule(type, instance) {
  switch (type) {
    case "generalStudyModule":
      return {
        studyDescription: instance.StudyDescription,
        studyDate: instance.StudyDate,
        studyTime: instance.StudyTime,
        accessionNumber: instance.AccessionNumber,
      };
    case "patientStudyModule":
      return {
        patientAge: toNumber(instance.PatientAge),
        patientSize: toNumber(instance.PatientSize),
        patientWeight: toNumber(instance.PatientWeight),
      };
    case "patientModule":
      return { patientName: formatPN(instance.PatientName), patientId: instance.PatientID };
    case "generalSeriesModule":
      return {
        modality: instance.Modality,
        seriesInstanceUID: instance.SeriesInstanceUID,
        seriesNumber: toNumber(instance.SeriesNumber),
        studyInstanceUID: instance.StudyInstanceUID,
        seriesDate: instance.SeriesDate && parseDA(instance.SeriesDate),
        seriesTime: instance.SeriesTime && parseTM(instance.SeriesTime),
      };
    case "generalImageModule":
      return {
        sopInstanceUID: instance.SOPInstanceUID,
        instanceNumber: toNumber(instance.InstanceNumber),
        lossyImageCompression: instance.LossyImageCompression,
        lossyImageCompressionRatio: instance.LossyImageCompressionRatio,
        lossyImageCompressionMethod: instance.LossyImageCompressionMethod,
      };
    case "imagePlaneModule":
      return imagePlaneModule(instance);
    case "cineModule":
      return {
        frameTime: instance.FrameTime,
        numberOfFrames: instance.NumberOfFrames ? Number(instance.NumberOfFrames) : 1,
      };
    case "voiLutModule":
      if (instance.WindowCenter == null || instance.WindowWidth == null) {
        return undefined;
      }
      return {
        windowCenter: toNumber([instance.WindowCenter].flat()),
        windowWidth: toNumber([instance.WindowWidth].flat()),
        voiLUTFunction: instance.VOILUTFunction,
      };
    case "modalityLutModule":
      if (instance.RescaleIntercept == null || instance.RescaleSlope == null) {
        return undefined;
      }
      return {
        rescaleIntercept: toNumber(instance.RescaleIntercept),
        rescaleSlope: toNumber(instance.RescaleSlope),
        rescaleType: instance.RescaleType,
      };
    case "sopCommonModule":
      return { sopClassUID: instance.SOPClassUID, sopInstanceUID: instance.SOPInstanceUID };
    default:
      return undefined;
  }
}

function imagePlaneModule(instance) {
  const orientation = toNumber(instance.ImageOrientationPatient);
  const [rowPixelSpacing, columnPixelSpacing] = toNumber(instance.PixelSpacing);
  return {
    frameOfReferenceUID: instance.FrameOfReferenceUID,
    rows: toNumber(instance.Rows),
    columns: toNumber(instance.Columns),
    spacingBetweenSlices: toNumber(instance.SpacingBetweenSlices),
    imageOrientationPatient: orientation,
    rowCosines: orientation.slice(0, 3),
    isDefaultValueSetForRowCosine: false,
    columnCosines: orientation.slice(3, 6),
    isDefaultValueSetForColumnCosine: false,
    imagePositionPatient: toNumber(instance.ImagePositionPatient),
    sliceThickness: toNumber(instance.SliceThickness),
    sliceLocation: toNumber(instance.SliceLocation),
    pixelSpacing: toNumber(instance.PixelSpacing),
    rowPixelSpacing,
    columnPixelSpacing,
    usingDefaultValues: false,
  };
}

function toNumber(value) {
  if (Array.isArray(value)) {
    return value.map((v) => (v !== undefined ? Number(v) : v));
  }
  return value !== undefined ? Number(value) : value;
}

function formatPN(name) {
  if (!name) {
    return undefined;
  }
  const text = name.Alphabetic ?? name;
  return text.replace("^", ", ").replace(/\^/g, " ").trim();
}

function parseDA(date) {
  return { year: Number(date.slice(0, 4)), month: Number(date.slice(4, 6)), day: Number(date.slice(6, 8)) };
}

function parseTM(time) {
  return {
    hours: Number(time.slice(0, 2)),
    minutes: time.length >= 4 ? Number(time.slice(2, 4)) : undefined,
    seconds: time.length >= 6 ? Number(time.slice(4, 6)) : undefined,
  };
}
