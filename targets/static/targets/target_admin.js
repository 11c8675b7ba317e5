/* The target form in the admin: Connection / Information / Dispatch as tabs, fields
   that do not apply hidden (rules from the kind's proxy, `show_if`), and the Test
   button above the form pressing the form's own Test button. Without JavaScript the
   page is the plain Django admin form with every section shown. */
(function () {
  "use strict";

  function makeTabs(form) {
    const sets = Array.from(form.querySelectorAll("fieldset.target-tab"));
    if (sets.length < 2) {
      return;
    }
    const bar = document.createElement("div");
    bar.className = "target-tabs";
    bar.setAttribute("role", "tablist");
    sets[0].parentNode.insertBefore(bar, sets[0]);
    const buttons = sets.map(function (fieldset, i) {
      const heading = fieldset.querySelector(".fieldset-heading");
      const name = heading ? heading.textContent.trim() : "Section " + (i + 1);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "target-tab-button";
      button.textContent = name;
      button.id = "tab-" + name.toLowerCase();
      button.setAttribute("role", "tab");
      if (fieldset.querySelector(".errorlist")) {
        button.classList.add("has-errors");
        button.title = "This section has errors";
      }
      button.addEventListener("click", function () {
        select(i, true);
      });
      bar.appendChild(button);
      fieldset.setAttribute("role", "tabpanel");
      fieldset.classList.add("target-tab-active");
      return button;
    });

    function select(index, remember) {
      sets.forEach(function (fieldset, i) {
        fieldset.classList.toggle("target-tab-hidden", i !== index);
      });
      buttons.forEach(function (button, i) {
        button.classList.toggle("selected", i === index);
        button.setAttribute("aria-selected", i === index ? "true" : "false");
      });
      if (remember && window.history.replaceState) {
        window.history.replaceState(null, "", "#" + buttons[index].id);
      }
    }

    let start = buttons.findIndex(function (b) {
      return b.classList.contains("has-errors");
    });
    if (start < 0) {
      start = buttons.findIndex(function (b) {
        return "#" + b.id === window.location.hash;
      });
    }
    select(start < 0 ? 0 : start, false);
  }

  function applyShowIf(form) {
    const data = document.getElementById("target-show-if");
    if (!data) {
      return;
    }
    const rules = JSON.parse(data.textContent);
    const control = function (name) {
      return form.querySelector('[name="' + name + '"]');
    };

    function update() {
      const hidden = new Set();
      rules.forEach(function (rule) {
        const input = control(rule.when);
        if (!input) {
          return; // not editable here (a view-only page shows everything)
        }
        let show = true;
        if (rule.checked) {
          show = input.checked;
        } else if (rule.equals.length) {
          show = rule.equals.indexOf(input.value) >= 0;
        } else if (rule.not_prefix) {
          show = !input.value.trim().toLowerCase().startsWith(rule.not_prefix.toLowerCase());
        }
        if (!show) {
          rule.fields.forEach(function (name) {
            hidden.add(name);
          });
        }
      });
      rules.forEach(function (rule) {
        rule.fields.forEach(function (name) {
          const row = form.querySelector(".form-row.field-" + name);
          if (row) {
            // A field with an error stays visible, whatever the rules say.
            const hide = hidden.has(name) && !row.querySelector(".errorlist");
            row.classList.toggle("target-field-hidden", hide);
          }
        });
      });
    }

    rules.forEach(function (rule) {
      const input = control(rule.when);
      if (input) {
        input.addEventListener("input", update);
        input.addEventListener("change", update);
      }
    });
    update();
  }

  function wireTestButton() {
    document.querySelectorAll("[data-submits]").forEach(function (button) {
      button.addEventListener("click", function () {
        const target = document.getElementById(button.dataset.submits);
        if (target) {
          target.click();
        }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = document.getElementById("target_form");
    if (!form) {
      return;
    }
    makeTabs(form);
    applyShowIf(form);
    wireTestButton();
  });
})();
