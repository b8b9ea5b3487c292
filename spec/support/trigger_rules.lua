-- The rules file of spec/trigger_spec.lua and its child processes
-- (spec/support/trigger_once.lua, spec/support/trigger_crash.lua). Loaded from the file
-- by the trigger (restricted globals), or with dofile() by a spec that changes a setting.
--
-- An event: { ticket = 1001, email = "jane@example.com", name = "Jane", channel = "phone",
--             tags = { ... }, brand = "acme", boom = true (map raises) }
return {
  map = function(e)
    if e.boom then error("the event has no requester", 0) end
    return {
      customer = { name = e.name or "Jane Doe", email = e.email },
      employee = { email = "paulagent@blancapeak.com" },
      channel = e.channel or "phone",
      ext_interaction_id = e.ticket,
      tags = e.tags,
      brand = e.brand,
    }
  end,
  channels = { phone = "integrated", chat = "integrated", email = "manual" },
  exclude_tags = { "spam" },
  do_not_send_tags = { "vip-no-survey" },
  suppression = { days = 7, per = "brand" },
  once_per_interaction = true,
}
