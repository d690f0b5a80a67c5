-- Argo CD health check for kompressor.io/CompressedModel (the `obj` global is the live object).
--
--   Progressing  no status yet; status.observedGeneration behind metadata.generation (the operator has not
--                acted on the latest spec); Pending, Compressing, Evaluating, Promoting, Retraining,
--                RollingBack, Shadowing and Canary (a candidate judged on live traffic); Serving whose Ready condition is not decided yet; DriftDetected while the
--                operator's automatic reaction (rollback or retrain) is still to come.
--   Healthy      Serving with the Ready condition True.
--   Suspended    AwaitingApproval (waits for the kompressor.io/approve annotation), Paused (spec.promotion.paused,
--                or too many automatic actions: waits for an edit or the kompressor.io/resume annotation).
--   Degraded     Rejected (gates failed), Failed (a Job exhausted its retries), Serving with Ready False, and
--                DriftDetected when nothing automatic will fix it: spec.drift.action is alert, or the Ready
--                condition is False (e.g. no revision to roll back to, retrain budget spent).
--   Unknown      a phase this script does not know (a newer operator).
local hs = {}

local function condition(status, wanted)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function say(phase, status, fallback)
  if status.message ~= nil and status.message ~= "" then
    return phase .. ": " .. status.message
  end
  return phase .. ": " .. fallback
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the resource"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local ready = condition(status, "Ready")

if phase == "Serving" then
  if ready ~= nil and ready.status == "True" then
    hs.status = "Healthy"
    local revision = ""
    if status.currentRevision ~= nil then
      revision = " revision " .. tostring(status.currentRevision)
    end
    hs.message = say(phase, status, "serving" .. revision)
  elseif ready ~= nil and ready.status == "False" then
    hs.status = "Degraded"
    hs.message = say(phase, status, "not ready: " .. tostring(ready.reason))
  else
    hs.status = "Progressing"
    hs.message = say(phase, status, "waiting for the serving Pods to be ready")
  end
elseif phase == "Pending" or phase == "Compressing" or phase == "Evaluating" or phase == "Promoting"
    or phase == "Retraining" or phase == "RollingBack" or phase == "Shadowing" or phase == "Canary" then
  hs.status = "Progressing"
  hs.message = say(phase, status, "in progress")
elseif phase == "AwaitingApproval" or phase == "Paused" then
  hs.status = "Suspended"
  hs.message = say(phase, status, "waiting for a person")
elseif phase == "Rejected" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = say(phase, status, "see the conditions and events")
elseif phase == "DriftDetected" then
  local action = nil
  if obj.spec ~= nil and obj.spec.drift ~= nil then
    action = obj.spec.drift.action
  end
  if action == "alert" or (ready ~= nil and ready.status == "False") then
    hs.status = "Degraded"
    hs.message = say(phase, status, "drift detected and no automatic action will fix it")
  else
    hs.status = "Progressing"
    hs.message = say(phase, status, "drift detected, reaction pending")
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
