-- Dafne Node auto-routing for Orthanc (tested with Orthanc 1.10).
--
-- When a series has received no new instance for "StableAge" seconds (orthanc.json), Orthanc
-- calls OnStableSeries. Image series of the modalities below are then sent to the Dafne Node,
-- which answers later by storing a DICOM-SEG into the same study (C-STORE from AE "DAFNE").
--
-- The send is an asynchronous Orthanc job (REST /modalities/<name>/store), not a blocking
-- SendToModality(): the Lua thread is never held up by a slow or absent node, and every send is
-- visible at http://localhost:8042/jobs (a failed one can be retried with
-- POST /jobs/<id>/resubmit).
--
-- Settings: any of these globals may be set by a Lua script listed before this one in
-- "LuaScripts" (the tests do that); otherwise the defaults below apply.

-- Symbolic name of the node in "DicomModalities" (orthanc.json).
DAFNE_MODALITY = DAFNE_MODALITY or 'dafne'
-- AE title the node uses when it stores its SEG results into Orthanc: never routed back.
DAFNE_AET = DAFNE_AET or 'DAFNE'
-- Series Modality values whose image series go to the node.
DAFNE_ROUTED_MODALITIES = DAFNE_ROUTED_MODALITIES or { MR = true }
-- Also send SEG series stored by anyone but the node (a radiologist's corrected SEG saved by a
-- viewer), so the node can learn from corrections. Off unless set to true.
if DAFNE_ROUTE_CORRECTIONS == nil then
   DAFNE_ROUTE_CORRECTIONS = false
end

local function DafneSendSeries(seriesId, why)
   -- Numbers must stay numbers: DumpJson(x, true) would turn them into strings, which the
   -- REST API rejects ("Bad file format").
   local request = {
      Resources = { seriesId },
      Asynchronous = true,
      Permissive = false,
   }
   local answer = RestApiPost('/modalities/' .. DAFNE_MODALITY .. '/store',
                              DumpJson(request), false)
   if answer == nil then
      -- Orthanc has logged the REST error just above (e.g. unknown modality name).
      print('dafne-autoroute: FAILED to queue series ' .. seriesId .. ' for ' .. DAFNE_MODALITY)
      return
   end
   print('dafne-autoroute: routed series ' .. seriesId .. ' (' .. why .. ') to '
         .. DAFNE_MODALITY .. ' as job ' .. tostring(ParseJson(answer)['ID']))
end

local function DafneSkip(seriesId, why)
   print('dafne-autoroute: skipped series ' .. seriesId .. ' (' .. why .. ')')
end

function OnStableSeries(seriesId, tags, metadata)
   local modality = string.upper(tags['Modality'] or '')
   local sender = string.upper(metadata['RemoteAET'] or '')

   -- Copies made inside Orthanc (modify/anonymize) are not new acquisitions.
   if metadata['ModifiedFrom'] ~= nil or metadata['AnonymizedFrom'] ~= nil then
      DafneSkip(seriesId, 'modified or anonymized copy')
   elseif sender == string.upper(DAFNE_AET) then
      -- The node's own results: sending them back would loop.
      DafneSkip(seriesId, 'stored by ' .. sender)
   elseif DAFNE_ROUTED_MODALITIES[modality] then
      DafneSendSeries(seriesId, 'modality ' .. modality .. ' from ' .. sender)
   elseif modality == 'SEG' and DAFNE_ROUTE_CORRECTIONS then
      DafneSendSeries(seriesId, 'correction SEG from ' .. sender)
   else
      DafneSkip(seriesId, 'modality ' .. modality .. ' from ' .. sender)
   end
end
